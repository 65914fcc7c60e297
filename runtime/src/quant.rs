//! Weight-only quantisation.
//!
//! **`q8`**: blocks of [`Q8_BLOCK`] consecutive values share one `f32` scale,
//! `amax / 127`; a value is `round(x / scale)` in `-127..=127`. A tensor of `n` values is
//! stored as its `n` int8 values, zero padding to a multiple of 64 bytes, then its
//! `n / Q8_BLOCK` scales. The compiler's interpreter rounds weights with
//! [`q8_roundtrip`], so it computes exactly what a q8 kernel reads.
//!
//! **ggml blocks** ([`Quant`]: `q4_0`, `q4_1`, `q4_k`, `q5_0`, `q5_1`, `q5_k`, `q6_k`,
//! `q8_0`): ggml's block formats, byte
//! for byte, one block after another along the contiguous last dimension. So a GGUF tensor stored in
//! one of them is bound as the file holds it, and any other weight is quantised here
//! ([`Quant::quantize`]). What a kernel reads is [`crate::gguf::dequantize`] of those bytes,
//! and the interpreter computes with exactly that ([`Quant::roundtrip`]).

use crate::gguf::{dequantize, GgmlType};

pub const Q8_BLOCK: usize = 32;

/// Byte offset of the scales in a q8 tensor of `n` values.
pub fn q8_scales_at(n: usize) -> usize {
    n.div_ceil(64) * 64
}

/// Bytes of a q8 tensor of `n` values (`n` a multiple of [`Q8_BLOCK`]).
pub fn q8_bytes(n: usize) -> usize {
    q8_scales_at(n) + n / Q8_BLOCK * 4
}

/// [`q8_bytes`], or `None` where the size overflows.
pub fn q8_bytes_checked(n: usize) -> Option<usize> {
    n.div_ceil(64).checked_mul(64)?.checked_add(n / Q8_BLOCK * 4)
}

fn block_scale(block: &[f32]) -> f32 {
    block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0
}

fn q(x: f32, scale: f32) -> i8 {
    if scale == 0.0 {
        0
    } else {
        (x / scale).round().clamp(-127.0, 127.0) as i8
    }
}

/// The stored form of `values` (a multiple of [`Q8_BLOCK`] long).
pub fn quantize_q8(values: &[f32]) -> Vec<u8> {
    let n = values.len();
    let mut out = vec![0u8; q8_bytes(n)];
    let at = q8_scales_at(n);
    for (b, block) in values.chunks(Q8_BLOCK).enumerate() {
        let s = block_scale(block);
        for (i, &x) in block.iter().enumerate() {
            out[b * Q8_BLOCK + i] = q(x, s) as u8;
        }
        out[at + 4 * b..at + 4 * b + 4].copy_from_slice(&s.to_le_bytes());
    }
    out
}

/// Replaces each value by what a q8 kernel reads back: `q · scale` in `f32`.
pub fn q8_roundtrip(values: &mut [f32]) {
    for block in values.chunks_mut(Q8_BLOCK) {
        let s = block_scale(block);
        for x in block.iter_mut() {
            *x = q(*x, s) as f32 * s;
        }
    }
}

/// ggml's block formats the kernels read: `Q4_0` (blocks of 32: an f16 scale `d`, values
/// `(q - 8) · d`), `Q4_1` (blocks of 32: f16 `d` and `m`, values `q · d + m`), `Q4_K`
/// (super-blocks of 256: f16 `d` and `dmin`, eight 6-bit scales and mins packed in 12
/// bytes, values `q · d·sc - dmin·m` per 32), `Q5_0`, `Q5_1` and `Q5_K` (the same with a
/// fifth bit per value kept apart: `(q - 16) · d`, `q · d + m`, `q · d·sc - dmin·m`),
/// `Q6_K` (super-blocks of 256: 6-bit
/// values as 128 bytes of low nibbles and 64 of high pairs, sixteen int8 scales, f16 `d`;
/// values `(q - 32) · d·sc` per 16, exact in `f32`: 11 + 7 + 6 significant bits) and
/// `Q8_0` (blocks of 32: f16 `d`, 32 int8 values `q · d`; the format of `q8` with an f16
/// scale, so a GGUF file's Q8_0 tensors are bound in place).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quant {
    Q4_0,
    Q4_1,
    Q4_K,
    Q6_K,
    Q8_0,
    Q5_0,
    Q5_1,
    Q5_K,
    Q2_K,
    Q3_K,
}

impl Quant {
    pub const ALL: [Quant; 10] = [
        Quant::Q2_K,
        Quant::Q3_K,
        Quant::Q4_0,
        Quant::Q4_1,
        Quant::Q4_K,
        Quant::Q5_0,
        Quant::Q5_1,
        Quant::Q5_K,
        Quant::Q6_K,
        Quant::Q8_0,
    ];

    /// The manifest's (and the spec's) name.
    pub fn name(self) -> &'static str {
        match self {
            Quant::Q4_0 => "q4_0",
            Quant::Q4_1 => "q4_1",
            Quant::Q4_K => "q4_k",
            Quant::Q6_K => "q6_k",
            Quant::Q8_0 => "q8_0",
            Quant::Q5_0 => "q5_0",
            Quant::Q5_1 => "q5_1",
            Quant::Q5_K => "q5_k",
            Quant::Q2_K => "q2_k",
            Quant::Q3_K => "q3_k",
        }
    }

    pub fn parse(s: &str) -> Option<Quant> {
        Quant::ALL.into_iter().find(|q| q.name() == s)
    }

    /// The GGUF type whose blocks these are.
    pub fn ggml(self) -> GgmlType {
        match self {
            Quant::Q4_0 => GgmlType::Q4_0,
            Quant::Q4_1 => GgmlType::Q4_1,
            Quant::Q4_K => GgmlType::Q4K,
            Quant::Q6_K => GgmlType::Q6K,
            Quant::Q8_0 => GgmlType::Q8_0,
            Quant::Q5_0 => GgmlType::Q5_0,
            Quant::Q5_1 => GgmlType::Q5_1,
            Quant::Q5_K => GgmlType::Q5K,
            Quant::Q2_K => GgmlType::Q2K,
            Quant::Q3_K => GgmlType::Q3K,
        }
    }

    /// Whether each value has a fifth bit apart from its nibble (`Q5_*`).
    pub fn fifth_bit(self) -> bool {
        matches!(self, Quant::Q5_0 | Quant::Q5_1 | Quant::Q5_K)
    }

    /// Values per block, and bytes per block.
    pub fn block(self) -> (usize, usize) {
        self.ggml().block()
    }

    /// Bytes of `n` values (a multiple of the block), or `None` where the size overflows.
    pub fn bytes_checked(self, n: usize) -> Option<usize> {
        let (per, size) = self.block();
        (n / per).checked_mul(size)
    }

    /// The stored form of `values` (a multiple of the block long).
    pub fn quantize(self, values: &[f32]) -> Vec<u8> {
        let (per, size) = self.block();
        let mut out = Vec::with_capacity(values.len() / per * size);
        for block in values.chunks_exact(per) {
            match self {
                Quant::Q4_0 => q4_0_block(block, &mut out),
                Quant::Q4_1 => q4_1_block(block, &mut out),
                Quant::Q4_K => qk_block(block, &mut out, 4),
                Quant::Q5_K => qk_block(block, &mut out, 5),
                Quant::Q5_0 => q5_block(block, &mut out, false),
                Quant::Q5_1 => q5_block(block, &mut out, true),
                Quant::Q2_K => q2_k_block(block, &mut out),
                Quant::Q3_K => q3_k_block(block, &mut out),
                Quant::Q6_K => q6_k_block(block, &mut out),
                Quant::Q8_0 => q8_0_block(block, &mut out),
            }
        }
        out
    }

    /// Replaces each value by what a kernel reads back from its stored form.
    pub fn roundtrip(self, values: &mut [f32]) {
        let back = dequantize(self.ggml(), &self.quantize(values), values.len());
        values.copy_from_slice(&back);
    }
}

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// Nibbles `q[i]` and `q[i + 16]` share byte `i`, as ggml packs a block of 32.
fn pack_nibbles(q: &[u8], out: &mut Vec<u8>) {
    let half = q.len() / 2;
    out.extend((0..half).map(|i| q[i] | (q[i + half] << 4)));
}

/// ggml's reference `Q4_0`: the value of largest magnitude maps to -8.
fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16_bytes(d));
    let q: Vec<u8> = x.iter().map(|&v| ((v * id + 8.5) as i32).clamp(0, 15) as u8).collect();
    pack_nibbles(&q, out);
}

/// ggml's reference `Q4_1`: 16 levels from the block's minimum to its maximum.
fn q4_1_block(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(min));
    let q: Vec<u8> = x.iter().map(|&v| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8).collect();
    pack_nibbles(&q, out);
}

/// `Q4_K` (`bits` 4) and `Q5_K` (5): each 32 values get the scale and (non-positive)
/// minimum of their range, the eight scales and mins are rounded to 6 bits against the
/// super-block's `d` and `dmin`, and each value to the nearest of its levels under those
/// rounded numbers. (ggml searches for scales that lower the squared error; this is the
/// plain range rule.) `Q5_K` keeps each value's fifth bit in 32 bytes before the nibbles:
/// bit `j` of byte `l` for value `l` of sub-block `j`.
fn qk_block(x: &[f32], out: &mut Vec<u8>, bits: u32) {
    let top = ((1 << bits) - 1) as f32;
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let lo = sub.iter().copied().fold(0f32, f32::min);
        let hi = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scales[j] = (hi - lo).max(0.0) / top;
        mins[j] = -lo;
    }
    let level = |v: &[f32; 8]| v.iter().fold(0f32, |m, &s| m.max(s)) / 63.0;
    let (d, dmin) = (half::f16::from_f32(level(&scales)), half::f16::from_f32(level(&mins)));
    let six = |v: f32, unit: f32| if unit > 0.0 { (v / unit).round().clamp(0.0, 63.0) as u8 } else { 0 };
    let sc: Vec<u8> = scales.iter().map(|&s| six(s, d.to_f32())).collect();
    let m: Vec<u8> = mins.iter().map(|&s| six(s, dmin.to_f32())).collect();
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        packed[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        packed[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    out.extend(packed);
    let mut q = [0u8; 256];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let (dl, ml) = (d.to_f32() * sc[j] as f32, dmin.to_f32() * m[j] as f32);
        for (i, &v) in sub.iter().enumerate() {
            q[32 * j + i] = if dl > 0.0 { ((v + ml) / dl).round().clamp(0.0, top) as u8 } else { 0 };
        }
    }
    if bits == 5 {
        out.extend((0..32).map(|l| (0..8).fold(0u8, |h, j| h | (q[32 * j + l] >> 4) << j)));
    }
    // Each 32 bytes hold two sub-blocks: the first's values low, the second's high.
    for chunk in q.chunks_exact(64) {
        let low: Vec<u8> = chunk.iter().map(|v| v & 15).collect();
        pack_nibbles(&low, out);
    }
}

/// ggml's reference `Q5_0` (`one` false: the value of largest magnitude maps to -16) and
/// `Q5_1` (32 levels from the block's minimum to its maximum): the low nibbles packed as
/// in `Q4_0`, the fifth bits in a little-endian `u32` before them, bit `j` for value `j`.
fn q5_block(x: &[f32], out: &mut Vec<u8>, one: bool) {
    let q: Vec<u8> = if one {
        let min = x.iter().copied().fold(f32::INFINITY, f32::min);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bytes(d));
        out.extend(f16_bytes(min));
        x.iter().map(|&v| (((v - min) * id + 0.5) as i32).clamp(0, 31) as u8).collect()
    } else {
        let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bytes(d));
        x.iter().map(|&v| ((v * id + 16.5) as i32).clamp(0, 31) as u8).collect()
    };
    let qh = q.iter().enumerate().fold(0u32, |h, (j, &v)| h | u32::from(v >> 4) << j);
    out.extend(qh.to_le_bytes());
    let low: Vec<u8> = q.iter().map(|v| v & 15).collect();
    pack_nibbles(&low, out);
}

/// The 2-bit fields `q[..]` of 128 values as Q2_K and Q3_K store them: byte `l` of 32
/// holds values `l`, `l + 32`, `l + 64`, `l + 96` from its low bits up.
fn pack_pairs(q: &[u8], out: &mut Vec<u8>) {
    out.extend((0..32).map(|l| (0..4).fold(0u8, |b, j| b | (q[l + 32 * j] & 3) << (2 * j))));
}

/// `Q2_K`: each 16 values get the scale and (non-positive) minimum of their range, rounded
/// to 4 bits against the super-block's `d` and `dmin`, and each value the nearest of its 4
/// levels under those. (ggml searches for scales that lower the squared error; this is
/// the plain range rule, as for `Q4_K`.)
fn q2_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    for (j, g) in x.chunks_exact(16).enumerate() {
        let lo = g.iter().copied().fold(0f32, f32::min);
        let hi = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scales[j] = (hi - lo).max(0.0) / 3.0;
        mins[j] = -lo;
    }
    let level = |v: &[f32; 16]| v.iter().fold(0f32, |m, &s| m.max(s)) / 15.0;
    let (d, dmin) = (half::f16::from_f32(level(&scales)), half::f16::from_f32(level(&mins)));
    let four = |v: f32, unit: f32| if unit > 0.0 { (v / unit).round().clamp(0.0, 15.0) as u8 } else { 0 };
    let sc: Vec<u8> = scales.iter().map(|&s| four(s, d.to_f32())).collect();
    let m: Vec<u8> = mins.iter().map(|&s| four(s, dmin.to_f32())).collect();
    out.extend(sc.iter().zip(&m).map(|(s, m)| s | m << 4));
    let mut q = [0u8; 256];
    for (j, g) in x.chunks_exact(16).enumerate() {
        let (dl, ml) = (d.to_f32() * sc[j] as f32, dmin.to_f32() * m[j] as f32);
        for (i, &v) in g.iter().enumerate() {
            q[16 * j + i] = if dl > 0.0 { ((v + ml) / dl).round().clamp(0.0, 3.0) as u8 } else { 0 };
        }
    }
    for h in q.chunks_exact(128) {
        pack_pairs(h, out);
    }
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
}

/// `Q3_K`: each 16 values' scale maps the one of largest magnitude to -4; `d` maps the
/// scale of largest magnitude to -32 (6-bit scales stored offset by 32); the values are
/// rounded to the scales as stored, `-4..=3`, kept as a low 2-bit field and a high bit
/// that is set for the values `0..=3`.
fn q3_k_block(x: &[f32], out: &mut Vec<u8>) {
    let signed_max = |v: &[f32]| v.iter().fold(0f32, |m, &a| if a.abs() > m.abs() { a } else { m });
    let scales: Vec<f32> = x.chunks_exact(16).map(|g| signed_max(g) / -4.0).collect();
    let d = half::f16::from_f32(signed_max(&scales) / -32.0);
    let sc: Vec<i32> = scales
        .iter()
        .map(|&s| if d.to_f32() != 0.0 { (s / d.to_f32()).round().clamp(-32.0, 31.0) as i32 } else { 0 })
        .collect();
    let mut q = [4u8; 256];
    for (j, g) in x.chunks_exact(16).enumerate() {
        let step = d.to_f32() * sc[j] as f32;
        if step != 0.0 {
            for (i, &v) in g.iter().enumerate() {
                q[16 * j + i] = ((v / step).round().clamp(-4.0, 3.0) + 4.0) as u8;
            }
        }
    }
    // The high bits: bit `4n + j` of byte `k` for value `128n + 32j + k`.
    out.extend((0..32).map(|k| (0..8).fold(0u8, |h, b| h | (q[32 * b + k] >> 2) << b)));
    for h in q.chunks_exact(128) {
        pack_pairs(h, out);
    }
    let s: Vec<u8> = sc.iter().map(|&s| (s + 32) as u8).collect();
    let mut packed = [0u8; 12];
    for i in 0..16 {
        if i < 8 {
            packed[i] |= s[i] & 15;
        } else {
            packed[i - 8] |= (s[i] & 15) << 4;
        }
        packed[8 + i % 4] |= (s[i] >> 4) << (2 * (i / 4));
    }
    out.extend(packed);
    out.extend(d.to_le_bytes());
}

/// `Q8_0`: the value of largest magnitude maps to ±127, each value rounded to the scale as
/// stored (so quantising what a kernel reads gives it back).
fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let d = half::f16::from_f32(x.iter().fold(0f32, |m, &v| m.max(v.abs())) / 127.0);
    out.extend(d.to_le_bytes());
    let d = d.to_f32();
    out.extend(x.iter().map(|&v| if d > 0.0 { (v / d).round().clamp(-127.0, 127.0) as i8 as u8 } else { 0 }));
}

/// `Q6_K` as ggml's reference lays it out, with its scales chosen more simply: each 16
/// values' scale maps the one of largest magnitude to -32; `d` maps the scale of largest
/// magnitude to -128 (an int8 scale, as ggml's); the values are rounded to the scales as
/// stored.
fn q6_k_block(x: &[f32], out: &mut Vec<u8>) {
    let signed_max = |v: &[f32]| v.iter().fold(0f32, |m, &a| if a.abs() > m.abs() { a } else { m });
    let scales: Vec<f32> = x.chunks_exact(16).map(|g| signed_max(g) / -32.0).collect();
    let d = half::f16::from_f32(signed_max(&scales) / -128.0);
    let sc: Vec<i8> = scales
        .iter()
        .map(|&s| if d.to_f32() != 0.0 { (s / d.to_f32()).round().clamp(-128.0, 127.0) as i8 } else { 0 })
        .collect();
    let mut q = [32u8; 256];
    for (j, g) in x.chunks_exact(16).enumerate() {
        let step = d.to_f32() * sc[j] as f32;
        if step != 0.0 {
            for (i, &v) in g.iter().enumerate() {
                q[16 * j + i] = ((v / step).round().clamp(-32.0, 31.0) + 32.0) as u8;
            }
        }
    }
    // Per 128 values: byte `l` of the low nibbles holds values `l` and `l + 64`, byte
    // `l + 32` values `l + 32` and `l + 96`; byte `l` of the high pairs holds the top two
    // bits of values `l`, `l + 32`, `l + 64`, `l + 96`.
    let (mut ql, mut qh) = (Vec::with_capacity(128), Vec::with_capacity(64));
    for h in q.chunks_exact(128) {
        ql.extend((0..32).map(|l| (h[l] & 15) | (h[l + 64] & 15) << 4));
        ql.extend((0..32).map(|l| (h[l + 32] & 15) | (h[l + 96] & 15) << 4));
        qh.extend(
            (0..32)
                .map(|l| h[l] >> 4 | (h[l + 32] >> 4) << 2 | (h[l + 64] >> 4) << 4 | (h[l + 96] >> 4) << 6),
        );
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend(d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_and_roundtrip_forms_agree() {
        let v: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.013).collect();
        let bytes = quantize_q8(&v);
        let mut r = v.clone();
        q8_roundtrip(&mut r);
        let at = q8_scales_at(64);
        for (i, &x) in r.iter().enumerate() {
            let s = f32::from_le_bytes(bytes[at + 4 * (i / 32)..at + 4 * (i / 32) + 4].try_into().unwrap());
            assert_eq!(x, bytes[i] as i8 as f32 * s);
            assert!((x - v[i]).abs() <= s / 2.0 + 1e-9);
        }
        assert_eq!(quantize_q8(&[0.0; 32])[..32], [0u8; 32]);
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::SplitMix64(seed);
        (0..n).map(|_| (rng.unit() as f32 - 0.3) * 0.1).collect()
    }

    #[test]
    fn block_formats_are_ggml_blocks_within_their_rounding() {
        for q in Quant::ALL {
            let v = values(1024, 7);
            let bytes = q.quantize(&v);
            let (per, size) = q.block();
            assert_eq!(bytes.len(), v.len() / per * size);
            let back = dequantize(q.ggml(), &bytes, v.len());
            for (blk, (x, y)) in v.chunks(per).zip(back.chunks(per)).enumerate() {
                let range = x.iter().fold(0f32, |m, &a| m.max(a.abs()));
                // A level is a 15th of the range (twice that for Q4_K's 6-bit scales); Q6_K's
                // a 32nd of each 16's largest magnitude, its int8 scales rounded.
                let worst = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                let bound = match q {
                    Quant::Q2_K => range / 2.0,
                    Quant::Q3_K => range / 6.0,
                    Quant::Q5_0 | Quant::Q5_1 => range / 15.0,
                    Quant::Q5_K => range / 7.0,
                    Quant::Q6_K => range / 32.0,
                    Quant::Q8_0 => range / 127.0,
                    _ => range * 2.0 / 15.0,
                };
                assert!(worst <= bound, "{q:?} block {blk}: error {worst} of range {range}");
            }
            // Quantising what a kernel reads gives it back (the rules are fixed points).
            let mut again = back.clone();
            q.roundtrip(&mut again);
            if !matches!(q, Quant::Q2_K | Quant::Q3_K | Quant::Q4_K | Quant::Q5_K) {
                assert_eq!(again, back, "{q:?}");
            }
        }
    }

    #[test]
    fn block_formats_of_zeros_and_constants() {
        for q in Quant::ALL {
            let mut z = vec![0.0; 256];
            q.roundtrip(&mut z);
            assert!(z.iter().all(|&x| x == 0.0), "{q:?}");
            let mut c = vec![0.25; 256];
            q.roundtrip(&mut c);
            assert!(c.iter().all(|&x| (x - 0.25).abs() < 0.25 / 15.0), "{q:?}: {:?}", &c[..4]);
        }
    }
}
