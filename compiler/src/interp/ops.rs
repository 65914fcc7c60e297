//! One plain function per op. Shapes were checked by the verifier; these functions index
//! with the sizes of their operands and accumulate sums in `f64`.

use super::Tensor;
use crate::ir::{alibi_slopes, Act, AttnMask, Experts, QkvLayout, QkvPart, Rope, Route};

pub fn gather(table: &Tensor, ids: &[i64], offset: usize) -> Result<Tensor, String> {
    let (rows, d) = (table.shape[0], table.shape[1]);
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        let r = id + offset as i64;
        if id < 0 || r as usize >= rows {
            return Err(format!("id {id} (row {r}) is out of range for a table of {rows} rows"));
        }
        out.extend_from_slice(table.row(r as usize));
    }
    Ok(Tensor::new(vec![ids.len(), d], out))
}

pub fn sinusoidal(pos: &[i64], dim: usize, base: f64) -> Tensor {
    let mut out = Vec::with_capacity(pos.len() * dim);
    for &p in pos {
        for i in 0..dim / 2 {
            let angle = p as f64 / base.powf(2.0 * i as f64 / dim as f64);
            out.push(angle.sin() as f32);
            out.push(angle.cos() as f32);
        }
    }
    Tensor::new(vec![pos.len(), dim], out)
}

/// A sinusoidal encoding in any style (`Op::Sinusoidal`), of positions `p + offset`.
pub fn sinusoid(pos: &[i64], dim: usize, base: f64, fairseq: bool, offset: usize) -> Tensor {
    let freqs = crate::ir::sinusoid_freqs(dim, base, fairseq);
    let mut out = Vec::with_capacity(pos.len() * dim);
    for &p in pos {
        for j in 0..dim {
            let (i, cos) = crate::ir::sinusoid_feature(dim, fairseq, j);
            let angle = (p + offset as i64) as f64 * freqs[i];
            out.push(if cos { angle.cos() } else { angle.sin() } as f32);
        }
    }
    Tensor::new(vec![pos.len(), dim], out)
}

pub fn zip(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Tensor {
    Tensor::new(a.shape.clone(), a.data.iter().zip(&b.data).map(|(&x, &y)| f(x, y)).collect())
}

pub fn map(a: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    Tensor::new(a.shape.clone(), a.data.iter().map(|&x| f(x)).collect())
}

/// Values per block of `round_q8`.
pub const Q8_ACT_BLOCK: usize = 32;

/// Largest magnitudes below this (`2^-96`) make a `round_q8` block zeros.
pub const Q8_ACT_TINY: f32 = f32::from_bits(31 << 23);

/// The scale `d = amax / 127` of a `round_q8` block whose largest magnitude is `amax` and
/// the factor `127 / amax` (both `f32` divisions), or `None` for a block holding an
/// infinity or NaN. A block below `Q8_ACT_TINY` has factor 0: its integers are zeros.
pub fn q8_scale(amax: f32) -> Option<(f32, f32)> {
    if !amax.is_finite() {
        return None;
    }
    Some(if amax < Q8_ACT_TINY { (0.0, 0.0) } else { (amax / 127.0, 127.0 / amax) })
}

/// `Op::RoundQ8` over the rows of `a` (its last dimension): each 32 values from a row's
/// start (the last block may be fewer) become `q · d` with `q = round(x · 127 / amax)` to
/// nearest, ties to even, an integer in `-127..=127`, and `d = amax / 127` (`q8_scale`),
/// llama.cpp's `Q8_0` rounding; a block holding an infinity or NaN stays as it is.
/// Rounding the values again gives back the same integers, and a scale within an ulp or
/// two of `d` (the largest is `fl(127 · d)`, within `127 · 2^-24` of an integer after
/// the division), which is how a kernel that multiplies integers recovers them.
pub fn round_q8(a: &Tensor) -> Tensor {
    let w = a.shape.last().copied().unwrap_or(1).max(1);
    let mut data = a.data.clone();
    for row in data.chunks_mut(w) {
        for b in row.chunks_mut(Q8_ACT_BLOCK) {
            let amax = f32::from_bits(b.iter().map(|x| x.to_bits() & 0x7fff_ffff).max().unwrap_or(0));
            let Some((d, inv)) = q8_scale(amax) else { continue };
            for x in b.iter_mut() {
                *x = (*x * inv).round_ties_even() as i32 as f32 * d;
            }
        }
    }
    Tensor::new(a.shape.clone(), data)
}

/// An activation, in f64 (`Act::apply`).
pub fn activation(a: Act, x: f32) -> f32 {
    a.apply(&mut crate::ir::F64, x as f64) as f32
}

/// Applies `f` to each row (the last axis) of `x`.
fn rows(x: &Tensor, mut f: impl FnMut(&[f32], &mut [f32])) -> Tensor {
    let d = *x.shape.last().unwrap();
    let mut out = vec![0.0; x.data.len()];
    for (src, dst) in x.data.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        f(src, dst);
    }
    Tensor::new(x.shape.clone(), out)
}

/// Where row `r`'s parameters start in a norm's gain or bias: 0, or for parameters of
/// one set per head (`[H, d]` for `x [H, T, d]`) the row's head's.
fn param_at(x: &Tensor, p: Option<&Tensor>, r: usize) -> usize {
    match p {
        Some(p) if p.shape.len() == 2 => (r / x.shape[1].max(1)) * p.shape[1],
        _ => 0,
    }
}

pub fn layer_norm(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Tensor {
    let mut r = 0;
    rows(x, |src, dst| {
        let (wo, bo) = (param_at(x, w, r), param_at(x, b, r));
        r += 1;
        let n = src.len() as f64;
        let mean = src.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..src.len() {
            let shift = b.map_or(0.0, |b| b.data[bo + i] as f64);
            let gain = w.map_or(1.0, |w| w.data[wo + i] as f64);
            dst[i] = ((src[i] as f64 - mean) * inv * gain + shift) as f32;
        }
    })
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, unit_offset: bool) -> Tensor {
    let mut r = 0;
    rows(x, |src, dst| {
        let wo = param_at(x, Some(w), r);
        r += 1;
        let ms = src.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / src.len() as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for i in 0..src.len() {
            let g = w.data[wo + i] as f64 + if unit_offset { 1.0 } else { 0.0 };
            dst[i] = (src[i] as f64 * inv * g) as f32;
        }
    })
}

/// `x [T, in] · Wᵀ + b` with `W [out, in]`, or `W [in, out]` when `transposed`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, transposed: bool) -> Tensor {
    let (t, inn) = (x.shape[0], x.shape[1]);
    let out_f = if transposed { w.shape[1] } else { w.shape[0] };
    let mut out = vec![0.0; t * out_f];
    for r in 0..t {
        let xr = x.row(r);
        for o in 0..out_f {
            let mut acc = b.map_or(0.0, |b| b.data[o] as f64);
            for (i, &xv) in xr.iter().enumerate() {
                let wv = if transposed { w.data[i * out_f + o] } else { w.data[o * inn + i] };
                acc += xv as f64 * wv as f64;
            }
            out[r * out_f + o] = acc as f32;
        }
    }
    Tensor::new(vec![t, out_f], out)
}

pub fn split_qkv(x: &Tensor, layout: QkvLayout, part: QkvPart, h: usize, kv: usize, hd: usize) -> Tensor {
    let t = x.shape[0];
    let n = if part == QkvPart::Q { h } else { kv };
    let start = layout.head_start(part, h, kv, hd);
    let col = |j: usize| start.at(j, hd);
    let mut out = Vec::with_capacity(t * n * hd);
    for r in 0..t {
        let row = x.row(r);
        for j in 0..n {
            out.extend_from_slice(&row[col(j)..col(j) + hd]);
        }
    }
    Tensor::new(vec![t, n * hd], out)
}

pub fn split_heads(x: &Tensor, h: usize) -> Tensor {
    let (t, w) = (x.shape[0], x.shape[1]);
    let hd = w / h;
    let mut out = vec![0.0; t * w];
    for r in 0..t {
        for j in 0..h {
            for c in 0..hd {
                out[(j * t + r) * hd + c] = x.data[r * w + j * hd + c];
            }
        }
    }
    Tensor::new(vec![h, t, hd], out)
}

pub fn merge_heads(x: &Tensor) -> Tensor {
    let (h, t, hd) = (x.shape[0], x.shape[1], x.shape[2]);
    let mut out = vec![0.0; t * h * hd];
    for j in 0..h {
        for r in 0..t {
            for c in 0..hd {
                out[r * h * hd + j * hd + c] = x.data[(j * t + r) * hd + c];
            }
        }
    }
    Tensor::new(vec![t, h * hd], out)
}

pub fn rope(x: &Tensor, pos: &[i64], r: &Rope) -> Tensor {
    let (h, t, hd) = (x.shape[0], x.shape[1], x.shape[2]);
    let rd = r.rotary_dim;
    let mut out = x.data.clone();
    let (inv_freqs, magnitude) = (r.inv_freqs(), r.magnitude());
    for j in 0..h {
        for (row, &p) in pos.iter().enumerate().take(t) {
            let base = (j * t + row) * hd;
            for (i, &freq) in inv_freqs.iter().enumerate() {
                let (sin, cos) = (p as f64 * freq).sin_cos();
                let (sin, cos) = (sin * magnitude, cos * magnitude);
                let (a, b) = if r.interleaved {
                    (base + 2 * i, base + 2 * i + 1)
                } else {
                    (base + i, base + i + rd / 2)
                };
                let (x1, x2) = (x.data[a] as f64, x.data[b] as f64);
                out[a] = (x1 * cos - x2 * sin) as f32;
                out[b] = (x2 * cos + x1 * sin) as f32;
            }
        }
    }
    Tensor::new(x.shape.clone(), out)
}

pub fn concat(a: &Tensor, b: &Tensor, axis: usize) -> Tensor {
    let outer: usize = a.shape[..axis].iter().product();
    let inner_a: usize = a.shape[axis..].iter().product();
    let inner_b: usize = b.shape[axis..].iter().product();
    let mut out = Vec::with_capacity(a.data.len() + b.data.len());
    for o in 0..outer {
        out.extend_from_slice(&a.data[o * inner_a..(o + 1) * inner_a]);
        out.extend_from_slice(&b.data[o * inner_b..(o + 1) * inner_b]);
    }
    let mut shape = a.shape.clone();
    shape[axis] += b.shape[axis];
    Tensor::new(shape, out)
}

/// Features `start..start + len` of the last axis.
pub fn slice(x: &Tensor, start: usize, len: usize) -> Tensor {
    let w = *x.shape.last().unwrap();
    let data = x.data.chunks(w).flat_map(|row| &row[start..start + len]).copied().collect();
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = len;
    Tensor::new(shape, data)
}

/// Each head `h` of `x [H, T, in]` by rows `h·p + at ..` of `w [H·p, c]` (`Op::HeadLinear`).
pub fn head_linear(x: &Tensor, w: &Tensor, at: usize, rows: usize, transposed: bool) -> Tensor {
    let (h, t, inn) = (x.shape[0], x.shape[1], x.shape[2]);
    let cols = *w.shape.last().unwrap();
    let p = w.data.len() / cols / h;
    let out = if transposed { cols } else { rows };
    let mut y = vec![0.0; h * t * out];
    for hh in 0..h {
        let m = |r: usize, c: usize| w.data[(hh * p + at + r) * cols + c] as f64;
        for i in 0..t {
            let xr = &x.data[(hh * t + i) * inn..][..inn];
            for o in 0..out {
                let acc: f64 = match transposed {
                    true => (0..inn).map(|k| xr[k] as f64 * m(k, o)).sum(),
                    false => (0..inn).map(|k| xr[k] as f64 * m(o, k)).sum(),
                };
                y[(hh * t + i) * out + o] = acc as f32;
            }
        }
    }
    Tensor::new(vec![h, t, out], y)
}

/// `a [H, M, K] · b [G, K, N]` (or `b [G, N, K]` transposed), head `h` with group
/// `h / (H / G)`.
pub fn head_matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Tensor {
    let (h, m, k) = (a.shape[0], a.shape[1], a.shape[2]);
    let g = b.shape[0];
    let n = if transpose_b { b.shape[1] } else { b.shape[2] };
    let mut out = vec![0.0; h * m * n];
    for hh in 0..h {
        let gg = hh / (h / g);
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f64;
                for c in 0..k {
                    let bv =
                        if transpose_b { b.data[(gg * n + j) * k + c] } else { b.data[(gg * k + c) * n + j] };
                    acc += a.data[(hh * m + i) * k + c] as f64 * bv as f64;
                }
                out[(hh * m + i) * n + j] = acc as f32;
            }
        }
    }
    Tensor::new(vec![h, m, n], out)
}

pub fn alibi(s: &Tensor, pos: &[i64], slope_scale: f64) -> Tensor {
    let (h, t, n) = (s.shape[0], s.shape[1], s.shape[2]);
    let slopes = alibi_slopes(h, slope_scale);
    let mut out = s.data.clone();
    for hh in 0..h {
        for (i, &p) in pos.iter().enumerate().take(t) {
            for j in 0..n {
                out[(hh * t + i) * n + j] -= (slopes[hh] * (p - j as i64) as f64) as f32;
            }
        }
    }
    Tensor::new(s.shape.clone(), out)
}

pub fn visible(m: &AttnMask, query: i64, key: i64) -> bool {
    (!m.causal || key <= query) && m.window.is_none_or(|w| (query - key).unsigned_abs() < w as u64)
}

pub fn mask(s: &Tensor, pos: &[i64], m: &AttnMask) -> Tensor {
    let (h, t, n) = (s.shape[0], s.shape[1], s.shape[2]);
    let mut out = s.data.clone();
    for hh in 0..h {
        for (i, &p) in pos.iter().enumerate().take(t) {
            for j in 0..n {
                if !visible(m, p, j as i64) {
                    out[(hh * t + i) * n + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::new(s.shape.clone(), out)
}

/// Softmax of each row; with `sinks` (one per head of `[H, T, S]` scores), each row's
/// denominator also counts `exp` of its head's sink.
pub fn softmax(s: &Tensor, sinks: Option<&Tensor>) -> Tensor {
    let per_head = if s.shape.len() == 3 { s.shape[1] } else { 1 };
    let mut row = 0;
    rows(s, |src, dst| {
        let sink = sinks.map(|t| t.data[row / per_head.max(1)]);
        row += 1;
        let max = src.iter().chain(&sink).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if max == f32::NEG_INFINITY {
            dst.fill(0.0);
            return;
        }
        let sum: f64 = src.iter().chain(&sink).map(|&v| ((v - max) as f64).exp()).sum();
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = (((v - max) as f64).exp() / sum) as f32;
        }
    })
}

/// The fused attention node: the primitive chain, composed.
/// `cap · tanh(x / cap)`, rounded to f32 after each step as the unfused ops
/// (`scale`, `act{tanh}`, `scale`) compute it.
pub fn soft_cap(x: f32, cap: f64) -> f32 {
    let x = (x as f64 * (1.0 / cap)) as f32;
    (activation(Act::Tanh, x) as f64 * cap) as f32
}

#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos: &[i64],
    scale: f64,
    m: &AttnMask,
    alibi_scale: Option<f64>,
    softcap: Option<f64>,
    sinks: Option<&Tensor>,
) -> Tensor {
    let mut s = map(&head_matmul(q, k, true), |x| (x as f64 * scale) as f32);
    if let Some(cap) = softcap {
        s = map(&s, |x| soft_cap(x, cap));
    }
    if let Some(f) = alibi_scale {
        s = alibi(&s, pos, f);
    }
    s = mask(&s, pos, m);
    head_matmul(&softmax(&s, sinks), v, false)
}

/// A router's dense weights `[T, E]`: each row's chosen experts (`Route::route`), zero
/// elsewhere.
pub fn route(logits: &Tensor, bias: Option<&Tensor>, r: &Route) -> Tensor {
    let bias: Option<Vec<f64>> = bias.map(|b| b.data.iter().map(|&v| v as f64).collect());
    rows(logits, |src, dst| {
        let l: Vec<f64> = src.iter().map(|&v| v as f64).collect();
        for (e, w) in r.route(&l, bias.as_deref()) {
            dst[e] = w as f32;
        }
    })
}

/// The experts of a mixture (`Op::Experts`): each row through its chosen experts only,
/// each expert as the MLP the dense one is (every linear map, activation and product
/// rounded to f32), their outputs weighted and summed in ascending expert order. `ws`:
/// the operands after the routing.
pub fn experts(x: &Tensor, route: &Tensor, ws: &[&Tensor], e: &Experts) -> Tensor {
    let (t, d, f) = (x.shape[0], x.shape[1], e.hidden);
    let o = e.operands();
    let w = |i: usize| ws[i - 2];
    // Every output of expert `k`'s matrix in operand `i`, for the row `xr`.
    let proj = |xr: &Tensor, i: usize, bias: Option<usize>, k: usize| {
        let m = w(i);
        let (a, b) = (m.shape[1], m.shape[2]);
        let mk = Tensor::new(vec![a, b], m.data[k * a * b..(k + 1) * a * b].to_vec());
        let bk = bias.map(|bi| {
            let bt = w(bi);
            let n = bt.shape[1];
            Tensor::new(vec![n], bt.data[k * n..(k + 1) * n].to_vec())
        });
        linear(xr, &mk, bk.as_ref(), e.transposed)
    };
    let mut out = vec![0.0f32; t * d];
    for r in 0..t {
        let xr = Tensor::new(vec![1, d], x.row(r).to_vec());
        let mut acc = vec![0.0f64; d];
        for k in 0..e.experts {
            let wt = route.data[r * e.experts + k];
            if wt == 0.0 {
                continue;
            }
            let u = proj(&xr, o.up, o.up_bias, k).data;
            let g = o.gate.map(|gi| proj(&xr, gi, o.gate_bias, k).data);
            let h: Vec<f32> = (0..f)
                .map(|j| {
                    let (gv, uv) = match (&g, e.interleaved) {
                        (_, true) => (Some(u[2 * j]), u[2 * j + 1]),
                        (Some(g), false) => (Some(g[e.gate_at.unwrap_or(0) + j]), u[e.up_at + j]),
                        (None, false) => (None, u[e.up_at + j]),
                    };
                    match gv {
                        Some(gv) => {
                            let (gc, uc) = e.glu(gv as f64, uv as f64);
                            activation(e.act, gc as f32) * uc as f32
                        }
                        None => activation(e.act, uv),
                    }
                })
                .collect();
            let h = Tensor::new(vec![1, f], h);
            let y = proj(&h, o.down, o.down_bias, k);
            for (a, &v) in acc.iter_mut().zip(&y.data) {
                *a += wt as f64 * v as f64;
            }
        }
        for (o, a) in out[r * d..(r + 1) * d].iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
    Tensor::new(vec![t, d], out)
}

/// Each row of `x [T, d]` times its number in `s [T, 1]`.
pub fn row_scale(x: &Tensor, s: &Tensor) -> Tensor {
    let d = x.shape[1];
    let data = x.data.iter().enumerate().map(|(i, &v)| (v as f64 * s.data[i / d] as f64) as f32).collect();
    Tensor::new(x.shape.clone(), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_match_the_paper() {
        let s = alibi_slopes(8, 1.0);
        assert!((s[0] - 0.5).abs() < 1e-12 && (s[7] - 1.0 / 256.0).abs() < 1e-12);
        // 6 heads: the 4 of a power of two, then the odd ones of the 8-head sequence.
        let s6 = alibi_slopes(6, 1.0);
        assert_eq!(s6.len(), 6);
        assert!((s6[3] - 2f64.powi(-8)).abs() < 1e-12);
        assert!((s6[4] - 0.5).abs() < 1e-12 && (s6[5] - 0.125).abs() < 1e-12);
    }

    #[test]
    fn round_q8_rounds_to_integers_per_32_and_again_to_the_same() {
        // The largest magnitude of a block (3.0) is 127 steps of 3/127; the last block of a
        // row (2 values) is its own.
        let row: Vec<f32> = (0..32).map(|i| i as f32 * 4.0 / 31.0 - 1.0).chain([0.5, -0.2]).collect();
        let r = round_q8(&Tensor::new(vec![1, 34], row.clone()));
        let (d, inv) = (3.0f32 / 127.0, 127.0f32 / 3.0);
        assert_eq!(r.data[31], 127.0 * d);
        for (x, y) in row[..32].iter().zip(&r.data) {
            assert_eq!(*y, (x * inv).round_ties_even() * d, "{x}");
        }
        let d2 = 0.5f32 / 127.0;
        assert_eq!(r.data[32..], [127.0 * d2, (-0.2f32 * (127.0 / 0.5)).round_ties_even() * d2]);
        // Rounding again gives the same integers, scaled within two ulps, on blocks of a
        // wide range of magnitudes.
        let wide: Vec<f32> =
            (0..320).map(|i| ((i * 7919) % 1000) as f32 * 1.37f32.powi(i % 90 - 60)).collect();
        let once = round_q8(&Tensor::new(vec![2, 160], wide));
        for (a, b) in once.data.iter().zip(&round_q8(&once).data) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-22), "{a} {b}");
        }
        // Tiny blocks are zeros; a NaN leaves its block as it was.
        let tiny = round_q8(&Tensor::new(vec![1, 2], vec![3e-30, -1e-31]));
        assert_eq!(tiny.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), [0, 0]);
        let nan = round_q8(&Tensor::new(vec![1, 2], vec![f32::NAN, 0.3]));
        assert!(nan.data[0].is_nan() && nan.data[1] == 0.3);
    }

    #[test]
    fn softmax_of_a_masked_row_ignores_masked_entries() {
        let s = Tensor::new(vec![1, 3], vec![1.0, f32::NEG_INFINITY, 1.0]);
        assert_eq!(softmax(&s, None).data, vec![0.5, 0.0, 0.5]);
    }
}
