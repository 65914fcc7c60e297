//! A small writer of MLIR's textual form: fresh SSA names, indentation, exact constants.
//!
//! Both MLIR emitters print text and let MLIR parse it: the text is what `tfc ir --stage
//! mlir` shows and what the snapshots keep, and building the same ops through the C API
//! would only add a second spelling of it.

use std::fmt::Write;

#[derive(Default)]
pub struct Text {
    pub out: String,
    next: usize,
    indent: usize,
}

impl Text {
    pub fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%{}", self.next)
    }

    pub fn line(&mut self, l: impl AsRef<str>) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
        self.out.push_str(l.as_ref());
        self.out.push('\n');
    }

    pub fn open(&mut self, l: impl AsRef<str>) {
        self.line(l);
        self.indent += 1;
    }

    pub fn close(&mut self, l: impl AsRef<str>) {
        self.indent -= 1;
        self.line(l);
    }

    /// A line between two regions of one op (`} else {`).
    pub fn reopen(&mut self, l: impl AsRef<str>) {
        self.indent -= 1;
        self.line(l);
        self.indent += 1;
    }

    /// Emits `%n = rhs` and returns `%n`.
    pub fn op(&mut self, rhs: impl AsRef<str>) -> String {
        let v = self.fresh();
        let mut l = String::new();
        let _ = write!(l, "{v} = {}", rhs.as_ref());
        self.line(l);
        v
    }

    /// An `f32` constant, written as its bit pattern so it parses back to the same value.
    pub fn f32(&mut self, x: f32) -> String {
        self.op(format!("arith.constant 0x{:08X} : f32", x.to_bits()))
    }

    pub fn f64(&mut self, x: f64) -> String {
        self.op(format!("arith.constant 0x{:016X} : f64", x.to_bits()))
    }

    pub fn index(&mut self, i: i64) -> String {
        self.op(format!("arith.constant {i} : index"))
    }

    pub fn int(&mut self, i: i64, ty: &str) -> String {
        self.op(format!("arith.constant {i} : {ty}"))
    }

    /// `a op b` for a binary arith op on one type.
    pub fn bin(&mut self, op: &str, a: &str, b: &str, ty: &str) -> String {
        self.op(format!("arith.{op} {a}, {b} : {ty}"))
    }
}

/// `x: f32` rounded to the nearest bf16 (ties to even), NaN kept quiet, as `f32`: in
/// integer ops, as `Kb::round_bf16`, since not every target has a bf16 type.
pub fn round_bf16(t: &mut Text, x: &str) -> String {
    let bits = t.op(format!("arith.bitcast {x} : f32 to i32"));
    let mut k = |v: u32| t.int(v as i32 as i64, "i32");
    let (sixteen, one, half, high, abs, inf, quiet) =
        (k(16), k(1), k(0x7fff), k(0xffff_0000), k(0x7fff_ffff), k(0x7f80_0000), k(0x0040_0000));
    let lsb = t.bin("shrui", &bits, &sixteen, "i32");
    let lsb = t.bin("andi", &lsb, &one, "i32");
    let up = t.bin("addi", &bits, &half, "i32");
    let up = t.bin("addi", &up, &lsb, "i32");
    let rounded = t.bin("andi", &up, &high, "i32");
    let mag = t.bin("andi", &bits, &abs, "i32");
    let nan = t.op(format!("arith.cmpi ugt, {mag}, {inf} : i32"));
    let q = t.bin("ori", &bits, &quiet, "i32");
    let q = t.bin("andi", &q, &high, "i32");
    let r = t.op(format!("arith.select {nan}, {q}, {rounded} : i32"));
    t.op(format!("arith.bitcast {r} : i32 to f32"))
}

/// `(d0, …, d{n-1})`.
pub fn dims(n: usize) -> String {
    let v: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
    format!("({})", v.join(", "))
}

/// `affine_map<(d0, …) -> (results)>` over `n` dimensions.
pub fn map(n: usize, results: &[String]) -> String {
    format!("affine_map<{} -> ({})>", dims(n), results.join(", "))
}

/// The identity map of rank `n`.
pub fn id_map(n: usize) -> String {
    map(n, &(0..n).map(|i| format!("d{i}")).collect::<Vec<_>>())
}

/// An element type's name in MLIR.
pub fn elem(dtype: crate::ir::DType) -> &'static str {
    match dtype {
        crate::ir::DType::F32 => "f32",
        crate::ir::DType::BF16 => "bf16",
        crate::ir::DType::F16 => "f16",
        // Never reached: the MLIR backends reject quantised weights first.
        crate::ir::DType::Q8 | crate::ir::DType::Quant(_) => "i8",
        crate::ir::DType::I32 => "i32",
    }
}
