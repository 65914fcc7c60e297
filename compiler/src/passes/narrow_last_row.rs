//! Narrowing to the last row: when only the last position's result is returned, row-wise
//! ops after the last mixing of positions need to run on that row alone. `last_row` moves
//! up through single-use row-wise ops (norms, linear maps, activations, scaling, rounding), so
//! prefill computes the final norm and the vocabulary projection for one row, not `T`.
//!
//! Before: `%80 = layernorm %79, …`, `%81 = linear %80, %1`, `%82 = last_row %81`
//! After:  `%80 = last_row %79`, `%81 = layernorm %80, …`, `%82 = linear %81, %1`

use super::{Pass, PassError, ShapeInfer};
use crate::ir::{Graph, Node, Op};

pub struct NarrowLastRow;

impl Pass for NarrowLastRow {
    fn name(&self) -> &'static str {
        "narrow_last_row"
    }

    fn run(&self, g: &mut Graph) -> Result<(), PassError> {
        for id in g.node_ids() {
            if !g.contains(id) || *g.op(id) != Op::LastRow {
                continue;
            }
            let mut last = id;
            loop {
                let x = g.operands(last)[0];
                let rowwise = matches!(
                    g.op(x),
                    Op::LayerNorm { .. }
                        | Op::RmsNorm { .. }
                        | Op::Linear { .. }
                        | Op::Activation(_)
                        | Op::Scale(_)
                        | Op::RoundBf16
                );
                if !rowwise || g.use_count(x) != 1 {
                    break;
                }
                // last_row(op(y, w…)) → op(last_row(y), w…)
                let y = g.operands(x)[0];
                let node = g.node(x).clone();
                let narrowed =
                    g.add(Node { op: Op::LastRow, ty: None, layer: node.layer, origin: node.origin }, &[y]);
                g.set_operand(x, 0, narrowed);
                g.replace_uses(last, x);
                g.remove(last);
                last = narrowed;
            }
        }
        // The narrowed ops now produce one row.
        ShapeInfer.run(g)
    }
}
