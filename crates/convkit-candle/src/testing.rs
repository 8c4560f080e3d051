//! What the custom ops' unit tests share: checking an op against candle's own ops, forward
//! and backward.

use candle_core::{CustomOp3, Device, Result, Tensor, Var};

/// A variable of `dims` standard normal values on the CPU.
pub(crate) fn random_var(dims: &[usize]) -> Var {
    Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap()).unwrap()
}

/// The largest absolute difference between two tensors of one shape.
fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts that `op` on random input, kernel and bias variables of the given dims agrees with
/// `candle` (the same function from candle's own ops) within `forward`, and that the three
/// gradients agree within `backward` under a loss that weighs every output differently. `case`
/// names the configuration in a failure.
pub(crate) fn assert_matches_candle(
    op: impl CustomOp3 + Send + Sync + 'static,
    [x, kernel, bias]: [&[usize]; 3],
    candle: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    [forward, backward]: [f32; 2],
    case: &str,
) {
    let vars = [("input", x), ("kernel", kernel), ("bias", bias)]
        .map(|(what, dims)| (what, random_var(dims)));
    let [x, kernel, bias] = [0, 1, 2].map(|i| vars[i].1.as_tensor());
    let ours = x.apply_op3(kernel, bias, op).unwrap();
    let theirs = candle(x, kernel, bias).unwrap();
    assert_eq!(ours.dims(), theirs.dims(), "{case}");
    let gap = max_gap(&ours, &theirs);
    assert!(gap < forward, "forward, {case}: {gap}");
    let weights = Tensor::randn(0f32, 1.0, ours.dims(), &Device::Cpu).unwrap();
    let gradients = |y: Tensor| {
        (y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (g_ours, g_theirs) = (gradients(ours), gradients(theirs));
    for (what, v) in &vars {
        let (a, b) = (g_ours.get(v.as_tensor()), g_theirs.get(v.as_tensor()));
        let gap = max_gap(a.unwrap(), b.unwrap());
        assert!(gap < backward, "{what} gradient, {case}: {gap}");
    }
}
