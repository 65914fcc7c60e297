//! The kernels: one `gpu.func` per distinct op instance, written with the builder.

use tfc_runtime::gpu::program::ArgKind;

use super::builder::K;
use super::{Attn, Kern, Target, Unary, BLOCK, LIN_ROWS};
use crate::backend::mlir::text::Text;
use crate::ir::{alibi_slopes, Act, HeadStart, QkvPart};

pub(super) fn kernel_text(target: Target, name: &str, k: &Kern) -> (Vec<ArgKind>, String) {
    use ArgKind::{F32, I32};
    let inputs: Vec<ArgKind> = match k {
        Kern::Positions => vec![],
        Kern::Gather { .. } => vec![F32, I32],
        Kern::Binary { .. } => vec![F32, F32],
        Kern::Unary { .. } | Kern::SplitQkv { .. } | Kern::SplitHeads { .. } | Kern::MergeHeads { .. } => {
            vec![F32]
        }
        Kern::Norm { gain, bias, .. } => vec![F32; 1 + *gain as usize + *bias as usize],
        Kern::Linear { bias, .. } => vec![F32; if *bias { 3 } else { 2 }],
        Kern::Rope { .. } => vec![F32, I32, F32],
        Kern::Attention(a) if a.sinks => vec![F32, F32, F32, I32, F32],
        Kern::Attention(_) => vec![F32, F32, F32, I32],
        Kern::LastRow { int, .. } => vec![if *int { I32 } else { F32 }],
        Kern::CacheStore { .. } | Kern::Slice { .. } => vec![F32],
        Kern::Concat { .. } | Kern::RowScale { .. } | Kern::HeadLinear { .. } => vec![F32, F32],
        Kern::Route(r) => vec![F32; 1 + r.choice_bias as usize],
        Kern::Experts { n, .. } => vec![F32; *n + 2],
    };
    let out_kind = if matches!(k, Kern::Positions | Kern::LastRow { int: true, .. }) { I32 } else { F32 };
    let mut kinds = inputs;
    if matches!(k, Kern::CacheStore { .. }) {
        kinds.push(F32); // the cache
    } else {
        kinds.push(out_kind);
    }
    kinds.push(I32); // dims
    let mut kb = K {
        t: Text::default(),
        target,
        shared: Vec::new(),
        args: kinds.iter().enumerate().map(|(i, &a)| (format!("%a{i}"), a)).collect(),
        tv: String::new(),
        pv: String::new(),
    };
    // The body first (it decides the workgroup memory), then the signature around it.
    kb.t.line("%tid = gpu.thread_id x");
    kb.t.line("%bx = gpu.block_id x");
    kb.t.line("%by = gpu.block_id y");
    let dims = kinds.len() - 1;
    let c0 = kb.c(0);
    let c1 = kb.c(1);
    let t32 = kb.ld(dims, &c0);
    let p32 = kb.ld(dims, &c1);
    kb.tv = kb.t.op(format!("arith.index_cast {t32} : i32 to index"));
    kb.pv = kb.t.op(format!("arith.index_cast {p32} : i32 to index"));
    body(&mut kb, k);
    let params: Vec<String> = kb.args.iter().map(|(n, a)| format!("{n}: {}", kb.mty(*a))).collect();
    let mut head = format!("gpu.func @{name}({})", params.join(", "));
    if target == Target::Cuda && !kb.shared.is_empty() {
        let w: Vec<String> = kb.shared.iter().map(|(n, s)| format!("{n}: {}", kb.sh_ty(*s))).collect();
        head += &format!(" workgroup({})", w.join(", "));
    }
    head += match target {
        Target::Vulkan => {
            " kernel attributes {spirv.entry_point_abi = #spirv.entry_point_abi<workgroup_size = [64, 1, 1]>} {"
        }
        Target::Cuda => " kernel attributes {known_block_size = array<i32: 64, 1, 1>} {",
    };
    let mut text = String::new();
    text += &head;
    text.push('\n');
    for l in kb.t.out.lines() {
        text += "  ";
        text += l;
        text.push('\n');
    }
    text += "  gpu.return\n}\n";
    (kinds, text)
}

/// The kernel bodies. Argument `i` is `%a{i}`; the output follows the inputs.
/// The kernel's body: one function per kind of kernel.
pub(super) fn body(k: &mut K, kern: &Kern) {
    match kern {
        Kern::Positions => positions(k, kern),
        Kern::Gather { .. } => gather(k, kern),
        Kern::Binary { .. } => binary(k, kern),
        Kern::Unary { .. } => unary(k, kern),
        Kern::Norm { .. } => norm(k, kern),
        Kern::Linear { .. } => linear(k, kern),
        Kern::SplitQkv { .. } => split_qkv(k, kern),
        Kern::SplitHeads { .. } | Kern::MergeHeads { .. } => heads(k, kern),
        Kern::Rope { .. } => rope(k, kern),
        Kern::Attention(_) => attention_kernel(k, kern),
        Kern::LastRow { .. } => last_row(k, kern),
        Kern::CacheStore { .. } => cache_store(k, kern),
        Kern::Slice { .. } => super::mixture::slice(k, kern),
        Kern::Concat { .. } => super::mixture::concat(k, kern),
        Kern::RowScale { .. } => super::mixture::row_scale(k, kern),
        Kern::HeadLinear { .. } => super::mixture::head_linear(k, kern),
        Kern::Route(_) => super::mixture::route(k, kern),
        Kern::Experts { .. } => super::mixture::experts(k, kern),
    }
}

pub(super) fn positions(k: &mut K, _: &Kern) {
    let row = "%bx".to_string();

    let t = k.tv.clone();
    let ok = k.cmp("ult", &row, &t);
    let z = k.c(0);
    let first = k.cmp("eq", "%tid", &z);
    let both = k.t.bin("andi", &ok, &first, "i1");
    k.if_(&both, |k| {
        let p = k.pv.clone();
        let v = k.ix("addi", &p, &row);
        let v = k.t.op(format!("arith.index_cast {v} : index to i32"));
        k.st(&v, 0, &row);
    });
}

pub(super) fn gather(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    let Kern::Gather { d, offset } = *kern else { unreachable!("a Gather kernel") };

    let id = k.ld(1, &row);
    let id = k.t.op(format!("arith.index_cast {id} : i32 to index"));
    let off = k.c(offset as i64);
    let r = k.ix("addi", &id, &off);
    let dc = k.c(d as i64);
    let src = k.ix("muli", &r, &dc);
    let dst = k.ix("muli", &row, &dc);
    k.threads(d, |k, j| {
        let s = k.ix("addi", &src, j);
        let v = k.ld(0, &s);
        let o = k.ix("addi", &dst, j);
        k.st(&v, 2, &o);
    });
}

pub(super) fn binary(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    let Kern::Binary { mul, w } = *kern else { unreachable!("a Binary kernel") };

    let wc = k.c(w as i64);
    let base = k.ix("muli", &row, &wc);
    k.threads(w, |k, j| {
        let i = k.ix("addi", &base, j);
        let a = k.ld(0, &i);
        let b = k.ld(1, &i);
        let v = k.fl(if mul { "mulf" } else { "addf" }, &a, &b);
        k.st(&v, 2, &i);
    });
}

pub(super) fn unary(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    let Kern::Unary { op, w } = *kern else { unreachable!("a Unary kernel") };

    let wc = k.c(w as i64);
    let base = k.ix("muli", &row, &wc);
    k.threads(w, |k, j| {
        let i = k.ix("addi", &base, j);
        let a = k.ld(0, &i);
        let v = match op {
            Unary::Scale(s) => {
                let c = k.f(s as f32);
                k.fl("mulf", &a, &c)
            }
            Unary::Act(act) => k.act(act, &a),
            Unary::RoundBf16 => crate::backend::mlir::text::round_bf16(&mut k.t, &a),
        };
        k.st(&v, 1, &i);
    });
}

pub(super) fn norm(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    let Kern::Norm { d, eps, layer, gain, bias, unit, sets, rows } = *kern else {
        unreachable!("a Norm kernel")
    };

    let sh = k.shared(BLOCK);
    let dc = k.c(d as i64);
    let base = k.ix("muli", &row, &dc);
    let hi = k.c(d as i64);
    let st = k.c(BLOCK as i64);
    let inv_d = k.f(1.0 / d as f32);
    let mean = if layer {
        let z = k.f(0.0);
        let part = k.for_("%tid", &hi, &st, &[z], |k, j, acc| {
            let i = k.ix("addi", &base, j);
            let x = k.ld(0, &i);
            vec![k.fl("addf", &acc[0], &x)]
        });
        let s = k.wg_sum(&part[0], &sh);
        Some(k.fl("mulf", &s, &inv_d))
    } else {
        None
    };
    let z = k.f(0.0);
    let part = k.for_("%tid", &hi, &st, &[z], |k, j, acc| {
        let i = k.ix("addi", &base, j);
        let mut x = k.ld(0, &i);
        if let Some(m) = &mean {
            x = k.fl("subf", &x, m);
        }
        let sq = k.fl("mulf", &x, &x);
        vec![k.fl("addf", &acc[0], &sq)]
    });
    let s = k.wg_sum(&part[0], &sh);
    let var = k.fl("mulf", &s, &inv_d);
    let e = k.f(eps as f32);
    let ve = k.fl("addf", &var, &e);
    let r = k.rsqrt(&ve);
    let out = 1 + gain as usize + bias as usize;
    // Where this row's parameters start: 0, or its head's set.
    let param = if sets > 1 {
        let n = k.dim(rows);
        let sc = k.c(sets as i64);
        let per = k.ix("divui", &n, &sc);
        let h = k.ix("divui", &row, &per);
        Some(k.ix("muli", &h, &dc))
    } else {
        None
    };
    k.threads(d, |k, j| {
        let pj = match &param {
            Some(p) => k.ix("addi", p, j),
            None => j.to_string(),
        };
        let i = k.ix("addi", &base, j);
        let mut x = k.ld(0, &i);
        if let Some(m) = &mean {
            x = k.fl("subf", &x, m);
        }
        x = k.fl("mulf", &x, &r);
        if gain {
            let mut gw = k.ld(1, &pj);
            if unit {
                let one = k.f(1.0);
                gw = k.fl("addf", &gw, &one);
            }
            x = k.fl("mulf", &x, &gw);
        }
        if bias {
            let b = k.ld(1 + gain as usize, &pj);
            x = k.fl("addf", &x, &b);
        }
        k.st(&x, out, &i);
    });
}

pub(super) fn linear(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    let Kern::Linear { inn, out, transposed, bias, rows } = *kern else { unreachable!("a Linear kernel") };

    // Workgroup (bx, by): columns bx·64 + tid of rows by·4 .. by·4+4.
    let sh = k.shared(LIN_ROWS * BLOCK);
    let n_rows = k.dim(rows);
    let bc = k.c(BLOCK as i64);
    let col0 = k.ix("muli", &row, &bc);
    let col = k.ix("addi", &col0, "%tid");
    let lr = k.c(LIN_ROWS as i64);
    let r0 = k.ix("muli", "%by", &lr);
    let outc = k.c(out as i64);
    let col_ok = k.cmp("ult", &col, &outc);
    let innc = k.c(inn as i64);
    let zeros: Vec<String> = (0..LIN_ROWS).map(|_| k.f(0.0)).collect();
    let lo = k.c(0);
    let acc = k.for_(&lo, &innc, &bc, &zeros, |k, k0, acc| {
        // Stage x[r0..r0+4][k0..k0+64] in workgroup memory.
        for r in 0..LIN_ROWS {
            let rc = k.c(r as i64);
            let rr = k.ix("addi", &r0, &rc);
            let kk = k.ix("addi", k0, "%tid");
            let rok = k.cmp("ult", &rr, &n_rows);
            let kok = k.cmp("ult", &kk, &innc);
            let ok = k.t.bin("andi", &rok, &kok, "i1");
            // Clamp the address so the load is always in bounds; select zero.
            let z = k.c(0);
            let rs = k.sel(&rok, &rr, &z, "index");
            let ks = k.sel(&kok, &kk, &z, "index");
            let a = k.ix("muli", &rs, &innc);
            let a = k.ix("addi", &a, &ks);
            let x = k.ld(0, &a);
            let zf = k.f(0.0);
            let v = k.sel(&ok, &x, &zf, "f32");
            let si = k.c((r * BLOCK) as i64);
            let si = k.ix("addi", &si, "%tid");
            k.sh_st(&v, &sh, LIN_ROWS * BLOCK, &si);
        }
        k.barrier();
        let kend = k.ix("addi", k0, &bc);
        let kend = k.t.op(format!("arith.minui {kend}, {innc} : index"));
        let n = k.ix("subi", &kend, k0);
        let one = k.c(1);
        let z = k.c(0);
        let colc = k.sel(&col_ok, &col, &z, "index");
        let acc = k.for_(&z, &n, &one, acc, |k, kk, acc| {
            let kabs = k.ix("addi", k0, kk);
            let wi = if transposed {
                let a = k.ix("muli", &kabs, &outc);
                k.ix("addi", &a, &colc)
            } else {
                let a = k.ix("muli", &colc, &innc);
                k.ix("addi", &a, &kabs)
            };
            let w = k.ld(1, &wi);
            (0..LIN_ROWS)
                .map(|r| {
                    let si = k.c((r * BLOCK) as i64);
                    let si = k.ix("addi", &si, kk);
                    let x = k.sh_ld(&sh, LIN_ROWS * BLOCK, &si);
                    let p = k.fl("mulf", &x, &w);
                    k.fl("addf", &acc[r], &p)
                })
                .collect()
        });
        k.barrier();
        acc
    });
    let out_arg = if bias { 3 } else { 2 };
    for (r, a) in acc.iter().enumerate() {
        let rc = k.c(r as i64);
        let rr = k.ix("addi", &r0, &rc);
        let rok = k.cmp("ult", &rr, &n_rows);
        let ok = k.t.bin("andi", &rok, &col_ok, "i1");
        k.if_(&ok, |k| {
            let mut v = a.clone();
            if bias {
                let b = k.ld(2, &col);
                v = k.fl("addf", &v, &b);
            }
            let o = k.ix("muli", &rr, &outc);
            let o = k.ix("addi", &o, &col);
            k.st(&v, out_arg, &o);
        });
    }
}

pub(super) fn split_qkv(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    let Kern::SplitQkv { layout, part, h, kv, hd } = *kern else { unreachable!("a SplitQkv kernel") };

    let n = if part == QkvPart::Q { h } else { kv };
    let width = n * hd;
    let win = (h + 2 * kv) * hd;
    let wc = k.c(width as i64);
    let winc = k.c(win as i64);
    let dst = k.ix("muli", &row, &wc);
    let src = k.ix("muli", &row, &winc);
    k.threads(width, |k, j| {
        let hdc = k.c(hd as i64);
        let head = k.ix("divui", j, &hdc);
        let within = k.ix("remui", j, &hdc);
        // The column where head `head` of this part starts (`HeadStart`).
        let start = match layout.head_start(part, h, kv, hd) {
            HeadStart::Run { first } => {
                let b = k.c(first as i64);
                let hh = k.ix("addi", &head, &b);
                k.ix("muli", &hh, &hdc)
            }
            HeadStart::Groups { per_group, group_width, offset } => {
                let gw = k.c(group_width as i64);
                let v = if per_group == 1 && offset > 0 {
                    k.ix("muli", &head, &gw)
                } else {
                    let pg = k.c(per_group as i64);
                    let gi = k.ix("divui", &head, &pg);
                    let gj = k.ix("remui", &head, &pg);
                    let a = k.ix("muli", &gi, &gw);
                    let b = k.ix("muli", &gj, &hdc);
                    k.ix("addi", &a, &b)
                };
                if offset > 0 {
                    let off = k.c(offset as i64);
                    k.ix("addi", &v, &off)
                } else {
                    v
                }
            }
        };
        let c = k.ix("addi", &start, &within);
        let s = k.ix("addi", &src, &c);
        let v = k.ld(0, &s);
        let o = k.ix("addi", &dst, j);
        k.st(&v, 1, &o);
    });
}

pub(super) fn heads(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    let (Kern::SplitHeads { h, hd, rows } | Kern::MergeHeads { h, hd, rows }) = *kern else {
        unreachable!("a head split or merge")
    };

    // Row r of [rows, h·hd] ↔ [h, rows, hd].
    let split = matches!(kern, Kern::SplitHeads { .. });
    let n = k.dim(rows);
    let w = k.c((h * hd) as i64);
    let flat = k.ix("muli", &row, &w);
    k.threads(h * hd, |k, j| {
        let hdc = k.c(hd as i64);
        let head = k.ix("divui", j, &hdc);
        let i = k.ix("remui", j, &hdc);
        let a = k.ix("muli", &head, &n);
        let a = k.ix("addi", &a, &row);
        let a = k.ix("muli", &a, &hdc);
        let per_head = k.ix("addi", &a, &i);
        let f = k.ix("addi", &flat, j);
        let (src, dst) = if split { (f, per_head) } else { (per_head, f) };
        let v = k.ld(0, &src);
        k.st(&v, 1, &dst);
    });
}

pub(super) fn rope(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    let Kern::Rope { hd, rd, interleaved, rows, max_seq } = *kern else { unreachable!("a Rope kernel") };

    // Workgroup = (head, row); the position indexes the cos/sin table.
    let n = k.dim(rows);
    let r = k.ix("remui", &row, &n);
    let p = k.ld(1, &r);
    let p = k.t.op(format!("arith.index_cast {p} : i32 to index"));
    let hdc = k.c(hd as i64);
    let base = k.ix("muli", &row, &hdc);
    let half = rd / 2;
    let halfc = k.c(half as i64);
    let tab = k.ix("muli", &p, &halfc);
    let sin_off = k.c((max_seq * half) as i64);
    k.threads(hd, |k, i| {
        let rdc = k.c(rd as i64);
        let rot = k.cmp("ult", i, &rdc);
        let two = k.c(2);
        let one = k.c(1);
        let (kk, partner, first) = if interleaved {
            let kk = k.ix("divui", i, &two);
            let odd = k.ix("remui", i, &two);
            let z = k.c(0);
            let first = k.cmp("eq", &odd, &z);
            let up = k.ix("addi", i, &one);
            let down = k.ix("subi", i, &one);
            (kk, k.sel(&first, &up, &down, "index"), first)
        } else {
            let first = k.cmp("ult", i, &halfc);
            let kk = k.ix("remui", i, &halfc);
            let up = k.ix("addi", i, &halfc);
            let down = k.ix("subi", i, &halfc);
            (kk, k.sel(&first, &up, &down, "index"), first)
        };
        let z = k.c(0);
        let partner = k.sel(&rot, &partner, i, "index");
        let kk = k.sel(&rot, &kk, &z, "index");
        let own_i = k.ix("addi", &base, i);
        let oth_i = k.ix("addi", &base, &partner);
        let own = k.ld(0, &own_i);
        let oth = k.ld(0, &oth_i);
        let ti = k.ix("addi", &tab, &kk);
        let cos = k.ld(2, &ti);
        let si = k.ix("addi", &ti, &sin_off);
        let sin = k.ld(2, &si);
        let ac = k.fl("mulf", &own, &cos);
        let bs = k.fl("mulf", &oth, &sin);
        let lo = k.fl("subf", &ac, &bs);
        let hi = k.fl("addf", &ac, &bs);
        let v = k.sel(&first, &lo, &hi, "f32");
        let v = k.sel(&rot, &v, &own, "f32");
        k.st(&v, 3, &own_i);
    });
}

pub(super) fn attention_kernel(k: &mut K, kern: &Kern) {
    let Kern::Attention(a) = *kern else { unreachable!("a Attention kernel") };
    attention(k, &a);
}

pub(super) fn last_row(k: &mut K, kern: &Kern) {
    let Kern::LastRow { w, rows, .. } = *kern else { unreachable!("a LastRow kernel") };

    let n = k.dim(rows);
    let one = k.c(1);
    let last = k.ix("subi", &n, &one);
    let wc = k.c(w as i64);
    let base = k.ix("muli", &last, &wc);
    k.threads(w, |k, j| {
        let s = k.ix("addi", &base, j);
        let v = k.ld(0, &s);
        k.st(&v, 1, j);
    });
}

pub(super) fn cache_store(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    let Kern::CacheStore { hd, max_seq, rows } = *kern else { unreachable!("a CacheStore kernel") };

    // Workgroup = (group, row): src [G, rows, hd] → cache [G, max_seq, hd] at P + row.
    let n = k.dim(rows);
    let gi = k.ix("divui", &row, &n);
    let r = k.ix("remui", &row, &n);
    let p = k.pv.clone();
    let pos = k.ix("addi", &p, &r);
    let ms = k.c(max_seq as i64);
    let hdc = k.c(hd as i64);
    let d = k.ix("muli", &gi, &ms);
    let d = k.ix("addi", &d, &pos);
    let dst = k.ix("muli", &d, &hdc);
    let src = k.ix("muli", &row, &hdc);
    k.threads(hd, |k, i| {
        let si = k.ix("addi", &src, i);
        let v = k.ld(0, &si);
        let di = k.ix("addi", &dst, i);
        k.st(&v, 1, &di);
    });
}

/// Online softmax attention for one (head, query row) per workgroup, 64 keys at a time.
pub(super) fn attention(k: &mut K, a: &Attn) {
    let Attn { h, g, hd, scale, softcap, causal, window, alibi, sinks, rows, s, stride } = *a;
    let row = "%bx".to_string();
    let sc = k.shared(BLOCK);
    let acc_sh = k.shared(hd.max(1));
    let q_sh = k.shared(hd.max(1));
    let n = k.dim(rows);
    let s_len = k.dim(s);
    let head = k.ix("divui", &row, &n);
    let t = k.ix("remui", &row, &n);
    let per = k.c((h / g) as i64);
    let grp = k.ix("divui", &head, &per);
    let hdc = k.c(hd as i64);
    let kv_stride = match stride {
        Some(st) => k.c(st as i64),
        None => k.ix("muli", &s_len, &hdc),
    };
    let kv_base = k.ix("muli", &grp, &kv_stride);
    let qbase = k.ix("muli", &row, &hdc);
    let pos = k.ld(3, &t);
    let pos = k.t.op(format!("arith.index_cast {pos} : i32 to index"));
    k.threads(hd, |k, j| {
        let qi = k.ix("addi", &qbase, j);
        let q = k.ld(0, &qi);
        k.sh_st(&q, &q_sh, hd, j);
        let z = k.f(0.0);
        k.sh_st(&z, &acc_sh, hd, j);
    });
    k.barrier();
    let slope = if let Some(f) = alibi {
        // The head's slope, chosen among constants.
        let slopes = alibi_slopes(h, f);
        let mut v = k.f(slopes[0] as f32);
        for (i, sl) in slopes.iter().enumerate().skip(1) {
            let ic = k.c(i as i64);
            let is = k.cmp("eq", &head, &ic);
            let c = k.f(*sl as f32);
            v = k.sel(&is, &c, &v, "f32");
        }
        Some(v)
    } else {
        None
    };
    let ninf = k.f(f32::NEG_INFINITY);
    let zf = k.f(0.0);
    let lo = k.c(0);
    let bc = k.c(BLOCK as i64);
    // A head's sink starts the softmax as a key of value zero: max = sink, sum = 1.
    let start = if sinks { vec![k.ld(4, &head), k.f(1.0)] } else { vec![ninf.clone(), zf.clone()] };
    let out_arg = if sinks { 5 } else { 4 };
    let res = k.for_(&lo, &s_len, &bc, &start, |k, c0, ml| {
        let (m, l) = (ml[0].clone(), ml[1].clone());
        // Each thread scores one key of the chunk.
        let key = k.ix("addi", c0, "%tid");
        let in_range = k.cmp("ult", &key, &s_len);
        let z = k.c(0);
        let keyc = k.sel(&in_range, &key, &z, "index");
        let kb = k.ix("muli", &keyc, &hdc);
        let kb = k.ix("addi", &kv_base, &kb);
        let zero = k.f(0.0);
        let lo = k.c(0);
        let one = k.c(1);
        let dot = k.for_(&lo, &hdc, &one, &[zero], |k, d, acc| {
            let q = k.sh_ld(&q_sh, hd, d);
            let ki = k.ix("addi", &kb, d);
            let kv = k.ld(1, &ki);
            let p = k.fl("mulf", &q, &kv);
            vec![k.fl("addf", &acc[0], &p)]
        });
        let scc = k.f(scale as f32);
        let mut v = k.fl("mulf", &dot[0], &scc);
        if let Some(cap) = softcap {
            // cap · tanh(v / cap)
            let inv = k.f((1.0 / cap) as f32);
            let inner = k.fl("mulf", &v, &inv);
            let th = k.act(Act::Tanh, &inner);
            let c = k.f(cap as f32);
            v = k.fl("mulf", &th, &c);
        }
        let pk = k.t.op(format!("arith.index_cast {pos} : index to i32"));
        let kk = k.t.op(format!("arith.index_cast {keyc} : index to i32"));
        let dist = k.t.bin("subi", &pk, &kk, "i32");
        if let Some(sl) = &slope {
            let df = k.t.op(format!("arith.sitofp {dist} : i32 to f32"));
            let b = k.fl("mulf", sl, &df);
            v = k.fl("subf", &v, &b);
        }
        let mut vis = in_range.clone();
        if causal {
            let z = k.t.int(0, "i32");
            let c = k.t.op(format!("arith.cmpi sge, {dist}, {z} : i32"));
            vis = k.t.bin("andi", &vis, &c, "i1");
        }
        if let Some(w) = window {
            let z = k.t.int(0, "i32");
            let neg = k.t.bin("subi", &z, &dist, "i32");
            let ad = k.t.op(format!("arith.maxsi {dist}, {neg} : i32"));
            let wc = k.t.int(w as i64, "i32");
            let c = k.t.op(format!("arith.cmpi slt, {ad}, {wc} : i32"));
            vis = k.t.bin("andi", &vis, &c, "i1");
        }
        let ninf = k.f(f32::NEG_INFINITY);
        let v = k.sel(&vis, &v, &ninf, "f32");
        k.sh_st(&v, &sc, BLOCK, "%tid");
        k.barrier();
        // Every thread: the chunk's max, the new running max, and the rescaling.
        let lo = k.c(0);
        let bcc = k.c(BLOCK as i64);
        let cm = k.for_(&lo, &bcc, &one, std::slice::from_ref(&m), |k, i, acc| {
            let x = k.sh_ld(&sc, BLOCK, i);
            vec![k.t.op(format!("arith.maximumf {}, {x} : f32", acc[0]))]
        });
        let m_new = cm[0].clone();
        let dead = k.t.op(format!("arith.cmpf oeq, {m_new}, {ninf} : f32"));
        let zf = k.f(0.0);
        let m_safe = k.sel(&dead, &zf, &m_new, "f32");
        let dm = k.fl("subf", &m, &m_safe);
        let corr = k.exp(&dm);
        k.barrier();
        // Probabilities of the chunk in place of the scores.
        let x = k.sh_ld(&sc, BLOCK, "%tid");
        let dx = k.fl("subf", &x, &m_safe);
        let p = k.exp(&dx);
        k.barrier();
        k.sh_st(&p, &sc, BLOCK, "%tid");
        k.barrier();
        let zero = k.f(0.0);
        let sum = k.for_(&lo, &bcc, &one, &[zero], |k, i, acc| {
            let x = k.sh_ld(&sc, BLOCK, i);
            vec![k.fl("addf", &acc[0], &x)]
        });
        let lc = k.fl("mulf", &l, &corr);
        let l_new = k.fl("addf", &lc, &sum[0]);
        // acc[j] = acc[j]·corr + Σ_i p_i · v[key_i][j], over the keys in range.
        let cnt = k.ix("subi", &s_len, c0);
        let cnt = k.t.op(format!("arith.minui {cnt}, {bcc} : index"));
        k.threads(hd, |k, j| {
            let a = k.sh_ld(&acc_sh, hd, j);
            let a = k.fl("mulf", &a, &corr);
            let lo = k.c(0);
            let one = k.c(1);
            let r = k.for_(&lo, &cnt, &one, &[a], |k, i, acc| {
                let p = k.sh_ld(&sc, BLOCK, i);
                let key = k.ix("addi", c0, i);
                let vi = k.ix("muli", &key, &hdc);
                let vi = k.ix("addi", &kv_base, &vi);
                let vi = k.ix("addi", &vi, j);
                let v = k.ld(2, &vi);
                let pv = k.fl("mulf", &p, &v);
                vec![k.fl("addf", &acc[0], &pv)]
            });
            k.sh_st(&r[0], &acc_sh, hd, j);
        });
        k.barrier();
        vec![m_new, l_new]
    });
    let l = res[1].clone();
    k.threads(hd, |k, j| {
        let a = k.sh_ld(&acc_sh, hd, j);
        let v = k.fl("divf", &a, &l);
        let o = k.ix("addi", &qbase, j);
        k.st(&v, out_arg, &o);
    });
}
