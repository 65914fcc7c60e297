//! Symbolic dimensions and tensor types.
//!
//! A dimension is a linear form `c + t·T + p·P` over two symbols: `T`, the number of
//! tokens a graph processes in one call, and `P`, the number of positions already held in
//! the KV cache. The model graph only uses `T`; the decode graph fixes `T = 1`, so its
//! cache concatenation has length `P + 1`.

use std::fmt;

pub use tfc_runtime::quant::Quant;

/// The binding of the symbolic dimensions for one call of a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymBinding {
    /// Number of new tokens.
    pub t: usize,
    /// Number of positions already in the cache.
    pub p: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    pub c: usize,
    pub t: usize,
    pub p: usize,
}

impl Dim {
    pub const T: Dim = Dim { c: 0, t: 1, p: 0 };
    pub const P: Dim = Dim { c: 0, t: 0, p: 1 };

    pub const fn fixed(c: usize) -> Dim {
        Dim { c, t: 0, p: 0 }
    }

    pub fn as_fixed(self) -> Option<usize> {
        (self.t == 0 && self.p == 0).then_some(self.c)
    }

    /// The value of this dimension under a binding.
    pub fn eval(self, b: SymBinding) -> usize {
        self.c + self.t * b.t + self.p * b.p
    }

    /// Replaces the symbol `T` by a constant.
    pub fn with_t(self, t: usize) -> Dim {
        Dim { c: self.c + self.t * t, t: 0, p: self.p }
    }
}

impl std::ops::Add for Dim {
    type Output = Dim;
    fn add(self, o: Dim) -> Dim {
        Dim { c: self.c + o.c, t: self.t + o.t, p: self.p + o.p }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let term = |k: usize, s: &str| {
            if k == 1 {
                s.to_string()
            } else {
                format!("{k}{s}")
            }
        };
        if self.p > 0 {
            parts.push(term(self.p, "P"));
        }
        if self.t > 0 {
            parts.push(term(self.t, "T"));
        }
        if self.c > 0 || parts.is_empty() {
            parts.push(self.c.to_string());
        }
        write!(f, "{}", parts.join("+"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Weight-only int8 in blocks of 32 with one `f32` scale each (`tfc_runtime::quant`).
    Q8,
    /// Weight-only 4- or 6-bit, in ggml's block formats (`tfc_runtime::quant::Quant`).
    Quant(Quant),
    I32,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8 => "q8",
            DType::Quant(q) => q.name(),
            DType::I32 => "i32",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "q8" => DType::Q8,
            "i32" => DType::I32,
            q => DType::Quant(Quant::parse(q)?),
        })
    }

    pub fn is_float(self) -> bool {
        self != DType::I32
    }

    /// The storage a weight whose rows (its contiguous last dimension) hold `row` values
    /// gets when `self` is asked for: quantised blocks never cross a row, so a row that
    /// is not whole blocks takes `q4_0` for `q2_k`, `q3_k` and `q4_k`, `q5_0` for `q5_k`
    /// and `q8` for `q6_k` (blocks of 32, not 256), else `f32`.
    pub fn for_rows(self, row: usize) -> DType {
        let whole = |per: usize| row % per == 0;
        match self {
            DType::Q8 if !whole(tfc_runtime::quant::Q8_BLOCK) => DType::F32,
            DType::Quant(q) if !whole(q.block().0) => match q {
                Quant::Q2_K | Quant::Q3_K | Quant::Q4_K => DType::Quant(Quant::Q4_0).for_rows(row),
                Quant::Q5_K => DType::Quant(Quant::Q5_0).for_rows(row),
                Quant::Q6_K => DType::Q8.for_rows(row),
                _ => DType::F32,
            },
            d => d,
        }
    }

    /// Whether it is one of the weight-only quantised formats (q8, ggml blocks).
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8 | DType::Quant(_))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub shape: Vec<Dim>,
    pub dtype: DType,
}

impl TensorType {
    pub fn new(shape: Vec<Dim>, dtype: DType) -> Self {
        TensorType { shape, dtype }
    }

    pub fn fixed(shape: &[usize], dtype: DType) -> Self {
        TensorType { shape: shape.iter().map(|&c| Dim::fixed(c)).collect(), dtype }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn eval(&self, b: SymBinding) -> Vec<usize> {
        self.shape.iter().map(|d| d.eval(b)).collect()
    }

    pub fn with_t(&self, t: usize) -> TensorType {
        TensorType { shape: self.shape.iter().map(|d| d.with_t(t)).collect(), dtype: self.dtype }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        write!(f, "[{}] {}", dims.join(", "), self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_print_and_evaluate() {
        let d = Dim::P + Dim::T;
        assert_eq!(d.to_string(), "P+T");
        assert_eq!(d.with_t(1).to_string(), "P+1");
        assert_eq!(Dim::fixed(0).to_string(), "0");
        assert_eq!(d.eval(SymBinding { t: 3, p: 5 }), 8);
    }
}
