//! Matrix products as kernels on the library's thread pool.
//!
//! A linear map, and attention's two products (scores `q·kᵀ`, and the probabilities times
//! the values), leave the graph's tensors: the graph function passes the operands' buffers
//! (pointer and strides, from `memref.extract_strided_metadata`) in an argument block to
//! `tfc__parallel_for(pool, kernel, args, tasks)`, and takes the result back as a tensor
//! over the buffer it allocated. A task is one block of output columns of one batch entry
//! (a head, for attention); every thread computes whole blocks, so the result does not
//! depend on the thread count.
//!
//! The kernels are written in the `vector` dialect, register tiles of `rows × cols`
//! vectors held in the `iter_args` of the loop over the inputs:
//! - `[K, N]` storage (`x·W`, and the values): `acc[r][c] += x[r, k] · W[k, c·lanes..]`, the
//!   sum in input order from the bias;
//! - `[N, K]` storage (`x·Wᵀ`, and the keys): `acc[r][c] += x[r, k..k+lanes] · W[c, k..]`,
//!   `lanes` partial sums reduced at the end, then the bias.
//!
//! Partial tiles (the last rows, columns or inputs) run as 1-row, 1-column or masked
//! tiles, so every tile has a static shape and nothing is scalarised.
//! The tile fits the target's vector registers: 4 × 4 vectors of 16 lanes with AVX-512
//! (32 registers), 3 × 3 of 8 with 16 registers.

use super::Func;
use crate::backend::mlir::text::Text;
use crate::ir::Dim;

/// How the second operand is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stored {
    /// `[K, N]`: rows of inputs.
    InOut,
    /// `[N, K]`: rows of outputs.
    OutIn,
}

/// One kernel of the module; the graphs share them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Kernel {
    pub stored: Stored,
    /// The second operand in bf16 (else f32).
    pub bf16: bool,
    pub bias: bool,
}

/// The register tile: `rows × cols` vectors of `lanes` f32.
#[derive(Clone, Copy, Debug)]
pub struct Tile {
    pub lanes: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Tile {
    /// The tile for a target with `registers` vector registers.
    pub fn for_registers(registers: usize) -> Tile {
        if registers >= 32 {
            Tile { lanes: 16, rows: 4, cols: 4 }
        } else {
            Tile { lanes: 8, rows: 3, cols: 3 }
        }
    }

    /// Output columns of one task.
    fn block(&self, stored: Stored) -> usize {
        match stored {
            Stored::InOut => self.cols * self.lanes,
            Stored::OutIn => self.cols,
        }
    }
}

/// The argument block's slots (`i64` each).
mod slot {
    pub const X: usize = 0;
    pub const X_ROW: usize = 1;
    pub const X_BATCH: usize = 2;
    pub const W: usize = 3;
    pub const W_ROW: usize = 4;
    pub const W_BATCH: usize = 5;
    /// Batch entries per entry of `W` (heads per key/value group).
    pub const PER: usize = 6;
    pub const BIAS: usize = 7;
    pub const OUT: usize = 8;
    pub const OUT_ROW: usize = 9;
    pub const OUT_BATCH: usize = 10;
    pub const ROWS: usize = 11;
    pub const K: usize = 12;
    pub const N: usize = 13;
    pub const BLOCKS: usize = 14;
    pub const COUNT: usize = 15;
}

pub const ARGS: &str = "%kargs";

impl Kernel {
    pub fn name(&self) -> String {
        let s = match self.stored {
            Stored::InOut => "kn",
            Stored::OutIn => "nk",
        };
        format!(
            "tfc__mm_{s}_{}{}",
            if self.bf16 { "bf16" } else { "f32" },
            if self.bias { "_bias" } else { "" }
        )
    }
}

/// A product's sizes: the output's shape (its rows an index value `rows` instead, where
/// they are not a `Dim`: an expert's gathered rows), `K`, and the batch entries per entry
/// of the second operand.
pub struct Shape<'s> {
    pub out: &'s [Dim],
    pub rows: Option<&'s str>,
    pub inner: Dim,
    pub per: usize,
}

/// An operand's buffer for a kernel: its first element and its row and batch strides.
pub struct Buf {
    pub ptr: String,
    pub row: String,
    pub batch: String,
}

impl Func<'_> {
    /// The argument block, once per graph function.
    pub(super) fn kernel_args(&mut self) {
        let n = self.t.int(slot::COUNT as i64, "i64");
        self.t.line(format!("{ARGS} = llvm.alloca {n} x i64 : (i64) -> !llvm.ptr"));
    }

    /// A tensor's buffer: `rank` 1, 2 (`[rows, cols]`) or 3 (`[batch, rows, cols]`), its
    /// last axis contiguous, as every tensor of the graphs is.
    pub(super) fn buf(&mut self, v: &str, tt: &str, rank: usize, el: &str) -> Buf {
        let shape = tt.trim_start_matches("tensor<").trim_end_matches('>');
        let shape = &shape[..shape.rfind('x').unwrap_or(0)];
        let strides = ["[1]", "[?, 1]", "[?, ?, 1]"][rank - 1];
        let mt = format!("memref<{shape}x{el}, strided<{strides}, offset: ?>>");
        let m = self.pointer_read(v, tt, &mt);
        let outs: Vec<String> = (0..2 + 2 * rank).map(|_| self.t.fresh()).collect();
        let idx = vec!["index"; 1 + 2 * rank].join(", ");
        self.t.line(format!(
            "{} = memref.extract_strided_metadata {m} : {mt} -> memref<{el}>, {idx}",
            outs.join(", ")
        ));
        let base =
            self.t.op(format!("memref.extract_aligned_pointer_as_index {} : memref<{el}> -> index", outs[0]));
        let ptr = self.at_offset(&base, &outs[1], el);
        let strides = &outs[2 + rank..];
        let row = match rank {
            1 => self.t.int(0, "i64"),
            _ => self.t.op(format!("arith.index_cast {} : index to i64", strides[rank - 2])),
        };
        let batch = if rank == 3 {
            self.t.op(format!("arith.index_cast {} : index to i64", strides[0]))
        } else {
            self.t.int(0, "i64")
        };
        Buf { ptr, row, batch }
    }

    /// The buffer of a tensor a kernel reads through a pointer, which bufferization does
    /// not see: it takes this op for the read, so the op must stay beside the call. A
    /// unique attribute keeps CSE from merging it into an earlier read of the same tensor,
    /// after which bufferization would let an op between the two overwrite the buffer.
    fn pointer_read(&mut self, v: &str, tt: &str, mt: &str) -> String {
        let m = self.t.fresh();
        let tag = &m[1..];
        self.t.line(format!(
            "{m} = bufferization.to_buffer {v} read_only {{tfc.read = {tag} : i64}} : {tt} to {mt}"
        ));
        m
    }

    /// A dimension's size as an index value: a fixed one as a new constant, so that a
    /// product inside a loop (an expert's) leaves no value `dim` would reuse outside it.
    fn size(&mut self, d: Dim) -> String {
        match d.as_fixed() {
            Some(c) => self.t.index(c as i64),
            None => self.dim(d),
        }
    }

    /// The pointer `base + offset` elements, from index values.
    fn at_offset(&mut self, base: &str, offset: &str, el: &str) -> String {
        let b = self.t.op(format!("arith.index_cast {base} : index to i64"));
        let p = self.t.op(format!("llvm.inttoptr {b} : i64 to !llvm.ptr"));
        let o = self.t.op(format!("arith.index_cast {offset} : index to i64"));
        self.t.op(format!("llvm.getelementptr {p}[{o}] : (!llvm.ptr, i64) -> !llvm.ptr, {el}"))
    }

    /// `out[b] = x[b] · w[b / per]` (stored as `k.stored`) `+ bias` on the pool: `x` is
    /// `[rows, K]` or `[batch, rows, K]`, the result `s.out` in f32.
    pub(super) fn product(
        &mut self,
        k: Kernel,
        x: (&str, &str),
        w: (&str, &str),
        bias: Option<(&str, &str)>,
        s: Shape,
    ) -> String {
        let Shape { out: out_shape, rows, inner, per } = s;
        self.kernels.insert(k);
        let rank = out_shape.len();
        let x = self.buf(x.0, x.1, rank, "f32");
        let w = self.buf(w.0, w.1, rank, if k.bf16 { "bf16" } else { "f32" });
        let bias = match bias {
            Some((b, bt)) => self.buf(b, bt, 1, "f32").ptr,
            None => self.t.op("llvm.mlir.zero : !llvm.ptr"),
        };
        let ot = super::tensor(out_shape, "f32");
        let mt = super::memref_of(&ot);
        // Each axis's size as an index value; `rows` stands for the rows' if given.
        let sizes: Vec<String> = (out_shape.iter().enumerate())
            .map(|(i, &d)| match rows {
                Some(r) if i == rank - 2 => r.to_string(),
                _ => self.size(d),
            })
            .collect();
        let dynamic: Vec<&str> = (out_shape.iter().zip(&sizes))
            .filter(|(d, _)| d.as_fixed().is_none())
            .map(|(_, s)| s.as_str())
            .collect();
        let out = self.t.op(format!("memref.alloc({}) {{alignment = 64 : i64}} : {mt}", dynamic.join(", ")));
        let p = self.t.op(format!("memref.extract_aligned_pointer_as_index {out} : {mt} -> index"));
        let zero = self.t.index(0);
        let out_ptr = self.at_offset(&p, &zero, "f32");
        let dims: Vec<String> =
            sizes.iter().map(|i| self.t.op(format!("arith.index_cast {i} : index to i64"))).collect();
        let (rows, n) = (&dims[rank - 2], &dims[rank - 1]);
        let out_batch = if rank == 3 { self.t.bin("muli", rows, n, "i64") } else { self.t.int(0, "i64") };
        let kd = self.size(inner);
        let kk = self.t.op(format!("arith.index_cast {kd} : index to i64"));
        let bw = self.t.int(self.tile.block(k.stored) as i64, "i64");
        let one = self.t.int(1, "i64");
        let up = self.t.bin("addi", n, &bw, "i64");
        let up = self.t.bin("subi", &up, &one, "i64");
        let blocks = self.t.bin("divui", &up, &bw, "i64");
        let batch = if rank == 3 { dims[0].clone() } else { one.clone() };
        let tasks = self.t.bin("muli", &batch, &blocks, "i64");
        let per = self.t.int(per as i64, "i64");
        let slots = [
            (slot::X, x.ptr),
            (slot::X_ROW, x.row),
            (slot::X_BATCH, x.batch),
            (slot::W, w.ptr),
            (slot::W_ROW, w.row),
            (slot::W_BATCH, w.batch),
            (slot::PER, per),
            (slot::BIAS, bias),
            (slot::OUT, out_ptr),
            (slot::OUT_ROW, n.clone()),
            (slot::OUT_BATCH, out_batch),
            (slot::ROWS, rows.clone()),
            (slot::K, kk),
            (slot::N, n.clone()),
            (slot::BLOCKS, blocks),
        ];
        for (i, v) in slots {
            let at = self.t.op(format!("llvm.getelementptr {ARGS}[{i}] : (!llvm.ptr) -> !llvm.ptr, i64"));
            let ty = if is_ptr_slot(i) { "!llvm.ptr" } else { "i64" };
            self.t.line(format!("llvm.store {v}, {at} : {ty}, !llvm.ptr"));
        }
        let f = self.t.op(format!("func.constant @{} : {KERNEL_TYPE}", k.name()));
        let fp = self.t.op(format!("builtin.unrealized_conversion_cast {f} : {KERNEL_TYPE} to !llvm.ptr"));
        self.t.line(format!(
            "llvm.call @tfc__parallel_for(%pool, {fp}, {ARGS}, {tasks}) : (!llvm.ptr, !llvm.ptr, !llvm.ptr, i64) -> ()"
        ));
        self.t.op(format!("bufferization.to_tensor {out} restrict writable : {mt} to {ot}"))
    }
}

const KERNEL_TYPE: &str = "(!llvm.ptr, i64, i64) -> ()";

fn is_ptr_slot(i: usize) -> bool {
    matches!(i, slot::X | slot::W | slot::BIAS | slot::OUT)
}

/// The declaration of the pool's entry, which the library's C half defines.
pub fn declare_pool(t: &mut Text) {
    t.line("llvm.func @tfc__parallel_for(!llvm.ptr, !llvm.ptr, !llvm.ptr, i64)");
}

/// A 1-D memref over a raw pointer, for the kernels' own indexing.
fn flat(t: &mut Text, ptr: &str, el: &str) -> String {
    let st = "!llvm.struct<(ptr, ptr, i64, array<1 x i64>, array<1 x i64>)>";
    let mut d = t.op(format!("llvm.mlir.poison : {st}"));
    d = t.op(format!("llvm.insertvalue {ptr}, {d}[0] : {st}"));
    d = t.op(format!("llvm.insertvalue {ptr}, {d}[1] : {st}"));
    let zero = t.int(0, "i64");
    d = t.op(format!("llvm.insertvalue {zero}, {d}[2] : {st}"));
    let size = t.int(i64::MAX / 8, "i64");
    d = t.op(format!("llvm.insertvalue {size}, {d}[3, 0] : {st}"));
    let one = t.int(1, "i64");
    d = t.op(format!("llvm.insertvalue {one}, {d}[4, 0] : {st}"));
    t.op(format!("builtin.unrealized_conversion_cast {d} : {st} to memref<?x{el}>"))
}

/// What a kernel's body reads from its argument block, as index values, and its views.
struct Args {
    x: String,
    w: String,
    bias: Option<String>,
    out: String,
    v: [String; slot::COUNT],
}

/// The kernel's tile code: `t` is the function body's writer.
struct Body<'a> {
    t: &'a mut Text,
    k: Kernel,
    tile: Tile,
    a: Args,
}

/// Emits the kernel `k` as a private function of the module.
pub fn emit(t: &mut Text, k: Kernel, tile: Tile) {
    t.open(format!(
        "func.func private @{}(%a: !llvm.ptr, %b: i64, %e: i64) attributes {{llvm.linkage = #llvm.linkage<internal>}} {{",
        k.name()
    ));
    let mut v: [String; slot::COUNT] = Default::default();
    let mut ptrs: [String; slot::COUNT] = Default::default();
    for i in 0..slot::COUNT {
        if i == slot::BIAS && !k.bias {
            continue;
        }
        let at = t.op(format!("llvm.getelementptr %a[{i}] : (!llvm.ptr) -> !llvm.ptr, i64"));
        if is_ptr_slot(i) {
            ptrs[i] = t.op(format!("llvm.load {at} : !llvm.ptr -> !llvm.ptr"));
        } else {
            let x = t.op(format!("llvm.load {at} : !llvm.ptr -> i64"));
            v[i] = t.op(format!("arith.index_cast {x} : i64 to index"));
        }
    }
    let wel = if k.bf16 { "i16" } else { "f32" };
    let a = Args {
        x: flat(t, &ptrs[slot::X], "f32"),
        w: flat(t, &ptrs[slot::W], wel),
        bias: k.bias.then(|| flat(t, &ptrs[slot::BIAS], "f32")),
        out: flat(t, &ptrs[slot::OUT], "f32"),
        v,
    };
    let mut body = Body { t, k, tile, a };
    body.tasks();
    body.t.line("return");
    body.t.close("}");
}

impl Body<'_> {
    fn c(&mut self, i: usize) -> String {
        self.t.index(i as i64)
    }

    fn arg(&self, i: usize) -> String {
        self.a.v[i].clone()
    }

    fn tasks(&mut self) {
        let b = self.t.op("arith.index_cast %b : i64 to index");
        let e = self.t.op("arith.index_cast %e : i64 to index");
        let one = self.c(1);
        let id = self.t.fresh();
        self.t.open(format!("scf.for {id} = {b} to {e} step {one} {{"));
        let blocks = self.arg(slot::BLOCKS);
        let batch = self.t.bin("divui", &id, &blocks, "index");
        let blk = self.t.bin("remui", &id, &blocks, "index");
        let xb = self.t.bin("muli", &batch, &self.arg(slot::X_BATCH), "index");
        let g = self.t.bin("divui", &batch, &self.arg(slot::PER), "index");
        let wb = self.t.bin("muli", &g, &self.arg(slot::W_BATCH), "index");
        let ob = self.t.bin("muli", &batch, &self.arg(slot::OUT_BATCH), "index");
        let bw = self.tile.block(self.k.stored);
        let bwc = self.c(bw);
        let n0 = self.t.bin("muli", &blk, &bwc, "index");
        let n = self.arg(slot::N);
        let end = self.t.bin("addi", &n0, &bwc, "index");
        let full = self.t.op(format!("arith.cmpi ule, {end}, {n} : index"));
        let base = Base { x: xb, w: wb, out: ob };
        let cols = self.tile.cols;
        self.t.open(format!("scf.if {full} {{"));
        self.rows(&base, cols, &n0, None);
        self.t.reopen("} else {");
        // The last block's columns: one vector (or one output) at a time, the last masked.
        let (step, lanes) = match self.k.stored {
            Stored::InOut => (self.tile.lanes, self.tile.lanes),
            Stored::OutIn => (1, 1),
        };
        let sc = self.c(step);
        let col = self.t.fresh();
        self.t.open(format!("scf.for {col} = {n0} to {n} step {sc} {{"));
        let mask = (self.k.stored == Stored::InOut).then(|| {
            let left = self.t.bin("subi", &n, &col, "index");
            let lc = self.c(lanes);
            let width = self.t.op(format!("arith.minui {left}, {lc} : index"));
            self.t.op(format!("vector.create_mask {width} : vector<{lanes}xi1>"))
        });
        self.rows(&base, 1, &col, mask.as_deref());
        self.t.close("}");
        self.t.close("}");
        self.t.close("}");
    }

    /// Every row of `cols` column vectors (or outputs) from `col`: whole tiles of rows, then
    /// one row at a time.
    fn rows(&mut self, base: &Base, cols: usize, col: &str, mask: Option<&str>) {
        let rows = self.arg(slot::ROWS);
        let r = self.tile.rows;
        let rc = self.c(r);
        let rest = self.t.bin("remui", &rows, &rc, "index");
        let whole = self.t.bin("subi", &rows, &rest, "index");
        let zero = self.c(0);
        let one = self.c(1);
        for (from, to, step, n) in [(zero, whole.clone(), rc, r), (whole, rows, one, 1)] {
            let r0 = self.t.fresh();
            self.t.open(format!("scf.for {r0} = {from} to {to} step {step} {{"));
            match self.k.stored {
                Stored::InOut => self.tile_kn(base, n, cols, &r0, col, mask),
                Stored::OutIn => self.tile_nk(base, n, cols, &r0, col),
            }
            self.t.close("}");
        }
    }

    fn vty(&self) -> String {
        format!("vector<{}xf32>", self.tile.lanes)
    }

    /// `base + i · stride + j`.
    fn at(&mut self, base: &str, i: &str, stride: &str, j: &str) -> String {
        let m = self.t.bin("muli", i, stride, "index");
        let s = self.t.bin("addi", base, &m, "index");
        self.t.bin("addi", &s, j, "index")
    }

    /// Row `r0 + r` of an operand.
    fn row(&mut self, r0: &str, r: usize) -> String {
        if r == 0 {
            r0.to_string()
        } else {
            let rc = self.c(r);
            self.t.bin("addi", r0, &rc, "index")
        }
    }

    /// Loads `lanes` f32 of a view from `i` (masked: zero past the mask). A bf16 view is
    /// read as `i16` and widened by a shift, exact and without bf16 vectors, which targets
    /// without AVX512_BF16 would round through a library call.
    fn load(&mut self, view: &str, el: &str, i: &str, mask: Option<&str>) -> String {
        let lanes = self.tile.lanes;
        let vt = format!("vector<{lanes}x{el}>");
        let zero = if el == "f32" { "0.0" } else { "0" };
        let v = match mask {
            None => self.t.op(format!("vector.load {view}[{i}] : memref<?x{el}>, {vt}")),
            Some(m) => {
                let z = self.t.op(format!("arith.constant dense<{zero}> : {vt}"));
                self.t.op(format!(
                    "vector.maskedload {view}[{i}], {m}, {z} : memref<?x{el}>, vector<{lanes}xi1>, {vt} into {vt}"
                ))
            }
        };
        if el == "f32" {
            return v;
        }
        let wide = format!("vector<{lanes}xi32>");
        let w = self.t.op(format!("arith.extui {v} : {vt} to {wide}"));
        let sixteen = self.t.op(format!("arith.constant dense<16> : {wide}"));
        let s = self.t.bin("shli", &w, &sixteen, &wide);
        self.t.op(format!("arith.bitcast {s} : {wide} to vector<{lanes}xf32>"))
    }

    /// The element the kernel reads the second operand as.
    fn wel(&self) -> &'static str {
        if self.k.bf16 {
            "i16"
        } else {
            "f32"
        }
    }

    /// A tile of `[K, N]` storage: `n` rows × `cols` vectors from column `col`.
    fn tile_kn(&mut self, base: &Base, n: usize, cols: usize, r0: &str, col: &str, mask: Option<&str>) {
        let (lanes, vt, wel) = (self.tile.lanes, self.vty(), self.wel());
        let col_at: Vec<String> = (0..cols)
            .map(|c| match c {
                0 => col.to_string(),
                _ => {
                    let off = self.c(c * lanes);
                    self.t.bin("addi", col, &off, "index")
                }
            })
            .collect();
        let init: Vec<String> = match self.a.bias.clone() {
            Some(b) => col_at.iter().map(|j| self.load(&b, "f32", j, mask)).collect(),
            None => vec![self.t.op(format!("arith.constant dense<0.0> : {vt}")); cols],
        };
        let inits: Vec<String> = (0..n).flat_map(|_| init.iter().cloned()).collect();
        let xrows: Vec<String> = (0..n)
            .map(|r| {
                let row = self.row(r0, r);
                let zero = self.c(0);
                self.at(&base.x, &row, &self.arg(slot::X_ROW), &zero)
            })
            .collect();
        let (zero, one, kk) = (self.c(0), self.c(1), self.arg(slot::K));
        let accs = self.loop_over(&zero, &kk, &one, &inits, |s, k, acc| {
            let w = s.a.w.clone();
            let wrow = s.at(&base.w, k, &s.arg(slot::W_ROW), &zero);
            let wv: Vec<String> = col_at
                .iter()
                .map(|j| {
                    let i = s.t.bin("addi", &wrow, j, "index");
                    s.load(&w, wel, &i, mask)
                })
                .collect();
            let mut next = Vec::new();
            for (r, xr) in xrows.iter().enumerate() {
                let i = s.t.bin("addi", xr, k, "index");
                let xs = s.t.op(format!("memref.load {}[{i}] : memref<?xf32>", s.a.x));
                let xv = s.t.op(format!("vector.broadcast {xs} : f32 to {vt}"));
                for (c, w) in wv.iter().enumerate() {
                    next.push(s.t.op(format!("vector.fma {xv}, {w}, {} : {vt}", acc[r * cols + c])));
                }
            }
            next
        });
        for r in 0..n {
            let row = self.row(r0, r);
            for (c, j) in col_at.iter().enumerate() {
                let i = self.at(&base.out, &row, &self.arg(slot::OUT_ROW), j);
                let (out, v) = (self.a.out.clone(), &accs[r * cols + c]);
                match mask {
                    None => self.t.line(format!("vector.store {v}, {out}[{i}] : memref<?xf32>, {vt}")),
                    Some(m) => self.t.line(format!(
                        "vector.maskedstore {out}[{i}], {m}, {v} : memref<?xf32>, vector<{lanes}xi1>, {vt}"
                    )),
                }
            }
        }
    }

    /// A tile of `[N, K]` storage: `n` rows × `cols` outputs from output `col`.
    fn tile_nk(&mut self, base: &Base, n: usize, cols: usize, r0: &str, col: &str) {
        let (lanes, vt, wel) = (self.tile.lanes, self.vty(), self.wel());
        let zero = self.c(0);
        let xrows: Vec<String> = (0..n)
            .map(|r| {
                let row = self.row(r0, r);
                self.at(&base.x, &row, &self.arg(slot::X_ROW), &zero)
            })
            .collect();
        let wrows: Vec<String> = (0..cols)
            .map(|c| {
                let o = self.row(col, c);
                self.at(&base.w, &o, &self.arg(slot::W_ROW), &zero)
            })
            .collect();
        // Lanes of inputs at `k` into every accumulator.
        let step = |s: &mut Self, k: &str, acc: &[String], mask: Option<&str>| {
            let (x, w) = (s.a.x.clone(), s.a.w.clone());
            let xv: Vec<String> = xrows
                .iter()
                .map(|xr| {
                    let i = s.t.bin("addi", xr, k, "index");
                    s.load(&x, "f32", &i, mask)
                })
                .collect();
            let mut next = acc.to_vec();
            for (c, wr) in wrows.iter().enumerate() {
                let i = s.t.bin("addi", wr, k, "index");
                let wv = s.load(&w, wel, &i, mask);
                for (r, x) in xv.iter().enumerate() {
                    next[r * cols + c] =
                        s.t.op(format!("vector.fma {x}, {wv}, {} : {vt}", acc[r * cols + c]));
                }
            }
            next
        };
        let z = self.t.op(format!("arith.constant dense<0.0> : {vt}"));
        let inits = vec![z; n * cols];
        let kk = self.arg(slot::K);
        let lc = self.c(lanes);
        let rest = self.t.bin("remui", &kk, &lc, "index");
        let whole = self.t.bin("subi", &kk, &rest, "index");
        let accs = self.loop_over(&zero, &whole, &lc, &inits, |s, k, acc| step(s, k, acc, None));
        // The last inputs, masked.
        let some = self.t.op(format!("arith.cmpi ne, {rest}, {zero} : index"));
        let res = self.t.fresh();
        let types = vec![vt.as_str(); accs.len()].join(", ");
        self.t.open(format!("{res}:{} = scf.if {some} -> ({types}) {{", accs.len()));
        let mask = self.t.op(format!("vector.create_mask {rest} : vector<{lanes}xi1>"));
        let next = step(self, &whole, &accs, Some(&mask));
        self.t.line(format!("scf.yield {} : {types}", next.join(", ")));
        self.t.reopen("} else {");
        self.t.line(format!("scf.yield {} : {types}", accs.join(", ")));
        self.t.close("}");
        for r in 0..n {
            let row = self.row(r0, r);
            for c in 0..cols {
                let acc = format!("{res}#{}", r * cols + c);
                let mut v =
                    self.t.op(format!("vector.reduction <add>, {acc} fastmath<reassoc> : {vt} into f32"));
                let o = self.row(col, c);
                if let Some(b) = self.a.bias.clone() {
                    let bv = self.t.op(format!("memref.load {b}[{o}] : memref<?xf32>"));
                    v = self.t.bin("addf", &v, &bv, "f32");
                }
                let i = self.at(&base.out, &row, &self.arg(slot::OUT_ROW), &o);
                self.t.line(format!("memref.store {v}, {}[{i}] : memref<?xf32>", self.a.out));
            }
        }
    }

    /// An `scf.for` carrying `accs` (vectors): `body` returns the next values.
    fn loop_over(
        &mut self,
        from: &str,
        to: &str,
        step: &str,
        accs: &[String],
        body: impl FnOnce(&mut Self, &str, &[String]) -> Vec<String>,
    ) -> Vec<String> {
        let vt = self.vty();
        let k = self.t.fresh();
        let args: Vec<String> = accs.iter().map(|_| self.t.fresh()).collect();
        let res = self.t.fresh();
        let iters: Vec<String> = args.iter().zip(accs).map(|(a, v)| format!("{a} = {v}")).collect();
        let types = vec![vt.as_str(); accs.len()].join(", ");
        self.t.open(format!(
            "{res}:{} = scf.for {k} = {from} to {to} step {step} iter_args({}) -> ({types}) {{",
            accs.len(),
            iters.join(", ")
        ));
        let next = body(self, &k, &args);
        self.t.line(format!("scf.yield {} : {types}", next.join(", ")));
        self.t.close("}");
        (0..accs.len()).map(|i| format!("{res}#{i}")).collect()
    }
}

/// Where the task's batch entry starts in each operand.
struct Base {
    x: String,
    w: String,
    out: String,
}
