//! The kernel builder: a `gpu.func` being written as text, with the index arithmetic,
//! loops, workgroup memory and the transcendentals (in `arith`, so no target needs a
//! device math library) that every kernel uses.

use tfc_runtime::gpu::program::ArgKind;

use super::{Target, BLOCK};
use crate::backend::mlir::text::Text;
use crate::ir::{Act, Arith, Dim};

/// A kernel body under construction.
pub(super) struct K {
    pub(super) t: Text,
    pub(super) target: Target,
    pub(super) shared: Vec<(String, usize)>,
    pub(super) args: Vec<(String, ArgKind)>,
    /// `T` and `P` as indices.
    pub(super) tv: String,
    pub(super) pv: String,
}

impl K {
    pub(super) fn mty(&self, kind: ArgKind) -> String {
        let e = if kind == ArgKind::F32 { "f32" } else { "i32" };
        format!("memref<?x{e}{}>", self.target.global())
    }
    pub(super) fn arg(&self, i: usize) -> String {
        self.args[i].0.clone()
    }
    pub(super) fn ld(&mut self, i: usize, idx: &str) -> String {
        let ty = self.mty(self.args[i].1);
        let a = self.arg(i);
        self.t.op(format!("memref.load {a}[{idx}] : {ty}"))
    }
    pub(super) fn st(&mut self, v: &str, i: usize, idx: &str) {
        let ty = self.mty(self.args[i].1);
        let a = self.arg(i);
        self.t.line(format!("memref.store {v}, {a}[{idx}] : {ty}"));
    }
    pub(super) fn sh_ty(&self, n: usize) -> String {
        match self.target {
            Target::Vulkan => format!("memref<{n}xf32, #spirv.storage_class<Workgroup>>"),
            Target::Cuda => format!("memref<{n}xf32, #gpu.address_space<workgroup>>"),
        }
    }
    pub(super) fn sh_ld(&mut self, s: &str, n: usize, idx: &str) -> String {
        let ty = self.sh_ty(n);
        self.t.op(format!("memref.load {s}[{idx}] : {ty}"))
    }
    pub(super) fn sh_st(&mut self, v: &str, s: &str, n: usize, idx: &str) {
        let ty = self.sh_ty(n);
        self.t.line(format!("memref.store {v}, {s}[{idx}] : {ty}"));
    }
    pub(super) fn c(&mut self, i: i64) -> String {
        self.t.index(i)
    }
    pub(super) fn f(&mut self, x: f32) -> String {
        self.t.f32(x)
    }
    pub(super) fn ix(&mut self, op: &str, a: &str, b: &str) -> String {
        self.t.bin(op, a, b, "index")
    }
    pub(super) fn fl(&mut self, op: &str, a: &str, b: &str) -> String {
        self.t.bin(op, a, b, "f32")
    }
    pub(super) fn dim(&mut self, d: Dim) -> String {
        let mut v = self.c(d.c as i64);
        for (k, s) in [(d.t, self.tv.clone()), (d.p, self.pv.clone())] {
            if k > 0 {
                let kc = self.c(k as i64);
                let m = self.ix("muli", &s, &kc);
                v = self.ix("addi", &v, &m);
            }
        }
        v
    }
    pub(super) fn cmp(&mut self, pred: &str, a: &str, b: &str) -> String {
        self.t.op(format!("arith.cmpi {pred}, {a}, {b} : index"))
    }
    pub(super) fn sel(&mut self, c: &str, a: &str, b: &str, ty: &str) -> String {
        self.t.op(format!("arith.select {c}, {a}, {b} : {ty}"))
    }
    /// `scf.for` with loop-carried `f32` values; returns the final values.
    pub(super) fn for_(
        &mut self,
        lo: &str,
        hi: &str,
        step: &str,
        init: &[String],
        body: impl FnOnce(&mut K, &str, &[String]) -> Vec<String>,
    ) -> Vec<String> {
        let iv = self.t.fresh();
        let carried: Vec<String> = init.iter().map(|_| self.t.fresh()).collect();
        let results: Vec<String> = init.iter().map(|_| self.t.fresh()).collect();
        let head = if init.is_empty() {
            format!("scf.for {iv} = {lo} to {hi} step {step} {{")
        } else {
            let it: Vec<String> = carried.iter().zip(init).map(|(c, i)| format!("{c} = {i}")).collect();
            let tys = vec!["f32"; init.len()].join(", ");
            let lhs = if results.len() == 1 {
                results[0].clone()
            } else {
                format!("{}:{}", results[0], results.len())
            };
            format!(
                "{lhs} = scf.for {iv} = {lo} to {hi} step {step} iter_args({}) -> ({tys}) {{",
                it.join(", ")
            )
        };
        self.t.open(head);
        let out = body(self, &iv, &carried);
        if !out.is_empty() {
            let tys = vec!["f32"; out.len()].join(", ");
            self.t.line(format!("scf.yield {} : {tys}", out.join(", ")));
        }
        self.t.close("}");
        if results.len() > 1 {
            (0..results.len()).map(|i| format!("{}#{i}", results[0])).collect()
        } else {
            results
        }
    }
    pub(super) fn if_(&mut self, cond: &str, body: impl FnOnce(&mut K)) {
        self.t.open(format!("scf.if {cond} {{"));
        body(self);
        self.t.close("}");
    }
    pub(super) fn barrier(&mut self) {
        self.t.line("gpu.barrier");
    }
    pub(super) fn shared(&mut self, n: usize) -> String {
        let name = format!("%sh{}", self.shared.len());
        if self.target == Target::Vulkan {
            let ty = self.sh_ty(n);
            self.t.line(format!("{name} = memref.alloc() : {ty}"));
        }
        self.shared.push((name.clone(), n));
        name
    }
    /// `for j in tid..n step 64`.
    pub(super) fn threads(&mut self, n: usize, body: impl FnOnce(&mut K, &str)) {
        let tid = "%tid".to_string();
        let hi = self.c(n as i64);
        let st = self.c(BLOCK as i64);
        self.for_(&tid, &hi, &st, &[], |k, j, _| {
            body(k, j);
            vec![]
        });
    }

    // Transcendentals in plain arith, identical on every target.
    pub(super) fn exp(&mut self, x: &str) -> String {
        // exp(x) = 2^n · e^r, n = round(x·log2 e), r = x - n·ln2 (two-part ln2).
        let lo = self.f(-87.0);
        let hi = self.f(88.0);
        let under = self.t.op(format!("arith.cmpf olt, {x}, {lo} : f32"));
        let xc = self.t.op(format!("arith.minimumf {x}, {hi} : f32"));
        let xc = self.t.op(format!("arith.maximumf {xc}, {lo} : f32"));
        let l2e = self.f(std::f32::consts::LOG2_E);
        let a = self.fl("mulf", &xc, &l2e);
        // Round to nearest by truncating a ± 0.5 (any nearby integer keeps |r| small).
        let half = self.f(0.5);
        let nhalf = self.f(-0.5);
        let zero = self.f(0.0);
        let neg = self.t.op(format!("arith.cmpf olt, {a}, {zero} : f32"));
        let h = self.sel(&neg, &nhalf, &half, "f32");
        let ah = self.fl("addf", &a, &h);
        let ni = self.t.op(format!("arith.fptosi {ah} : f32 to i32"));
        let n = self.t.op(format!("arith.sitofp {ni} : i32 to f32"));
        let c1 = self.f(0.693_145_75);
        let c2 = self.f(1.428_606_8e-6);
        let t1 = self.fl("mulf", &n, &c1);
        let r = self.fl("subf", &xc, &t1);
        let t2 = self.fl("mulf", &n, &c2);
        let r = self.fl("subf", &r, &t2);
        // e^r on |r| ≤ ln2/2: Taylor to degree 7 (relative error < 2e-8).
        let coef = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];
        let mut p = self.f(coef[0]);
        for c in &coef[1..] {
            let m = self.fl("mulf", &p, &r);
            let cc = self.f(*c);
            p = self.fl("addf", &m, &cc);
        }
        let bias = self.t.int(127, "i32");
        let e = self.t.bin("addi", &ni, &bias, "i32");
        let sh = self.t.int(23, "i32");
        let bits = self.t.bin("shli", &e, &sh, "i32");
        let scale = self.t.op(format!("arith.bitcast {bits} : i32 to f32"));
        let v = self.fl("mulf", &p, &scale);
        let z = self.f(0.0);
        self.sel(&under, &z, &v, "f32")
    }
    pub(super) fn rsqrt(&mut self, x: &str) -> String {
        let bits = self.t.op(format!("arith.bitcast {x} : f32 to i32"));
        let one = self.t.int(1, "i32");
        let half_bits = self.t.bin("shrui", &bits, &one, "i32");
        let magic = self.t.int(0x5f37_59df, "i32");
        let g = self.t.bin("subi", &magic, &half_bits, "i32");
        let mut y = self.t.op(format!("arith.bitcast {g} : i32 to f32"));
        let half = self.f(0.5);
        let three_halves = self.f(1.5);
        let hx = self.fl("mulf", x, &half);
        for _ in 0..4 {
            let yy = self.fl("mulf", &y, &y);
            let t = self.fl("mulf", &hx, &yy);
            let d = self.fl("subf", &three_halves, &t);
            y = self.fl("mulf", &y, &d);
        }
        y
    }
    pub(super) fn tanh(&mut self, x: &str) -> String {
        // tanh(x) = 1 - 2/(e^{2x} + 1)
        let two = self.f(2.0);
        let x2 = self.fl("mulf", x, &two);
        let e = self.exp(&x2);
        let one = self.f(1.0);
        let d = self.fl("addf", &e, &one);
        let q = self.fl("divf", &two, &d);
        self.fl("subf", &one, &q)
    }
    pub(super) fn erf(&mut self, x: &str) -> String {
        let zero = self.f(0.0);
        let neg = self.t.op(format!("arith.cmpf olt, {x}, {zero} : f32"));
        let nx = self.t.op(format!("arith.negf {x} : f32"));
        let ax = self.sel(&neg, &nx, x, "f32");
        let p = self.f(0.327_591_1);
        let one = self.f(1.0);
        let px = self.fl("mulf", &p, &ax);
        let d = self.fl("addf", &one, &px);
        let t = self.fl("divf", &one, &d);
        let a = [1.061_405_4_f32, -1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6];
        let mut poly = self.f(a[0]);
        for c in &a[1..] {
            let m = self.fl("mulf", &poly, &t);
            let cc = self.f(*c);
            poly = self.fl("addf", &m, &cc);
        }
        poly = self.fl("mulf", &poly, &t);
        let x2 = self.fl("mulf", &ax, &ax);
        let nx2 = self.t.op(format!("arith.negf {x2} : f32"));
        let e = self.exp(&nx2);
        let pe = self.fl("mulf", &poly, &e);
        let y = self.fl("subf", &one, &pe);
        let ny = self.t.op(format!("arith.negf {y} : f32"));
        self.sel(&neg, &ny, &y, "f32")
    }
    /// An activation (`Act::apply`) in f32, the transcendentals as `exp`, `tanh`, `erf`.
    pub(super) fn act(&mut self, a: Act, x: &str) -> String {
        a.apply(self, x.to_string())
    }
    /// Sum of a value over the workgroup, the same in every thread.
    pub(super) fn wg_sum(&mut self, v: &str, sh: &str) -> String {
        self.sh_st(v, sh, BLOCK, "%tid");
        self.barrier();
        let z = self.f(0.0);
        let lo = self.c(0);
        let hi = self.c(BLOCK as i64);
        let one = self.c(1);
        let r = self.for_(&lo, &hi, &one, &[z], |k, i, acc| {
            let x = k.sh_ld(sh, BLOCK, i);
            vec![k.fl("addf", &acc[0], &x)]
        });
        self.barrier();
        r[0].clone()
    }
}

/// `Arith` in f32 kernel text.
impl Arith for K {
    type V = String;
    fn c(&mut self, v: f64) -> String {
        self.f(v as f32)
    }
    fn add(&mut self, a: String, b: String) -> String {
        self.fl("addf", &a, &b)
    }
    fn mul(&mut self, a: String, b: String) -> String {
        self.fl("mulf", &a, &b)
    }
    fn div(&mut self, a: String, b: String) -> String {
        self.fl("divf", &a, &b)
    }
    fn neg(&mut self, a: String) -> String {
        self.t.op(format!("arith.negf {a} : f32"))
    }
    fn max(&mut self, a: String, b: String) -> String {
        self.t.op(format!("arith.maximumf {a}, {b} : f32"))
    }
    fn exp(&mut self, a: String) -> String {
        K::exp(self, &a)
    }
    fn tanh(&mut self, a: String) -> String {
        K::tanh(self, &a)
    }
    fn erf(&mut self, a: String) -> String {
        K::erf(self, &a)
    }
}
