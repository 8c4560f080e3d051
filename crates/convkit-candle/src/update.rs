//! The optimizer update in one pass on the CPU ([`Ops::update_in_place`]): the variable and
//! its slots are written in place through candle's in-place ops, the gradient is read where
//! it lies; nothing is allocated.
//!
//! [`Ops::update_in_place`]: convkit_core::primitives::Ops::update_in_place

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor};

use convkit_core::primitives::ElementUpdate;

use crate::host::{values, values_mut};
use crate::threads::CandleThreads;

/// The name errors give the op.
const OP: &str = "convkit update";

/// Runs `update` over `variable` and `slots` (changed in place) and `grad`, all contiguous f32
/// CPU tensors of one shape; `false`, having run nothing, when one is not.
pub(crate) fn in_place(
    variable: &Tensor,
    grad: &Tensor,
    slots: &[&Tensor],
    update: &mut ElementUpdate<'_>,
) -> Result<bool> {
    let ok = |t: &Tensor| t.device().is_cpu() && t.is_contiguous() && t.shape() == variable.shape();
    if !ok(grad) || !slots.iter().all(|s| ok(s)) || !variable.is_contiguous() {
        return Ok(false);
    }
    let op = Outer {
        slots,
        update: RefCell::new(Some(update)),
    };
    // The gradient is a source of the outer op: candle refuses it, rather than deadlocking,
    // should it ever share the variable's storage.
    variable.inplace_op2(grad, &op)?;
    Ok(true)
}

/// The variable's level: holds it mutably and the gradient for reading, then the slots'.
struct Outer<'a, 'f> {
    slots: &'a [&'a Tensor],
    update: RefCell<Option<&'a mut ElementUpdate<'f>>>,
}

impl InplaceOp2 for Outer<'_, '_> {
    fn name(&self) -> &'static str {
        "convkit-update"
    }

    fn cpu_fwd(&self, w: &mut CpuStorage, wl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let w = values_mut(w, wl, OP, "variable")?;
        let g = values(g, gl, OP, "gradient")?;
        let update = self.update.borrow_mut().take().expect("an op runs once");
        nest(self.slots, Vec::new(), w, g, update)
    }
}

/// Holds one more slot mutably (candle lends a storage only inside an op), then the rest;
/// with every slot held, runs the update.
fn nest(
    rest: &[&Tensor],
    mut held: Vec<&mut [f32]>,
    w: &mut [f32],
    g: &[f32],
    update: &mut ElementUpdate<'_>,
) -> Result<()> {
    match rest.split_first() {
        None => {
            update(&CandleThreads, w, g, &mut held);
            Ok(())
        }
        Some((slot, rest)) => slot.inplace_op1(&Level {
            rest,
            state: RefCell::new(Some((held, w, update))),
            g,
        }),
    }
}

/// One slot's level of [`nest`].
struct Level<'a, 'f> {
    rest: &'a [&'a Tensor],
    #[allow(clippy::type_complexity)] // what one level passes to the next, once
    state: RefCell<Option<(Vec<&'a mut [f32]>, &'a mut [f32], &'a mut ElementUpdate<'f>)>>,
    g: &'a [f32],
}

impl InplaceOp1 for Level<'_, '_> {
    fn name(&self) -> &'static str {
        "convkit-update-slot"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (held, w, update) = self.state.borrow_mut().take().expect("an op runs once");
        let mut held: Vec<&mut [f32]> = held;
        held.push(values_mut(storage, layout, OP, "optimizer slot")?);
        nest(self.rest, held, w, self.g, update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use convkit_cpu::Threads;

    /// Every value and slot is changed in place and the gradient read, in one element order.
    #[test]
    fn updates_the_variable_and_slots_in_place() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let g = Tensor::new(&[[0.5f32, 0.25], [1.0, 2.0]], &dev).unwrap();
        let (m, v) = (w.zeros_like().unwrap(), w.zeros_like().unwrap());
        let mut update = |_: &dyn Threads, w: &mut [f32], g: &[f32], slots: &mut [&mut [f32]]| {
            for i in 0..w.len() {
                slots[0][i] = g[i];
                slots[1][i] = 2.0 * g[i];
                w[i] -= g[i];
            }
        };
        assert!(in_place(&w, &g, &[&m, &v], &mut update).unwrap());
        let read = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(read(&w), [0.5, 1.75, 2.0, 2.0]);
        assert_eq!(read(&m), [0.5, 0.25, 1.0, 2.0]);
        assert_eq!(read(&v), [1.0, 0.5, 2.0, 4.0]);
        // A transposed (non-contiguous) gradient is left to the composite form.
        let mut untouched =
            |_: &dyn Threads, _: &mut [f32], _: &[f32], _: &mut [&mut [f32]]| panic!("ran");
        assert!(!in_place(&w, &g.t().unwrap(), &[&m], &mut untouched).unwrap());
    }
}
