//! Weight-only int8 quantisation (`q8`): blocks of [`Q8_BLOCK`] consecutive values share
//! one `f32` scale, `amax / 127`; a value is `round(x / scale)` in `-127..=127`. A tensor
//! of `n` values is stored as its `n` int8 values, zero padding to a multiple of 64
//! bytes, then its `n / Q8_BLOCK` scales. The compiler's interpreter rounds weights with
//! [`q8_roundtrip`], so it computes exactly what a q8 kernel reads.

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
}
