//! The CIFAR-10 tutorial end to end: an ANN trained with SGD against a CNN trained with adam,
//! both classification reports, and a grid of test images with true and predicted class names.
//!
//! `cargo run --release --features tch --example cifar10 -- tch-cpu [EPOCHS] [LIMIT]`
//! (any engine name works; EPOCHS defaults to the tutorial's 5 and 10, LIMIT to every image).
//! Writes `runs/cifar10/{ann,cnn}-report.txt`, `samples.png` and both training curves.

use convkit::prelude::*;

fn main() -> convkit::Result<()> {
    let mut args = std::env::args().skip(1);
    let engine = args.next().unwrap_or_else(|| "candle-cpu".into());
    let epochs: Option<usize> = args.next().and_then(|a| a.parse().ok());
    let limit: Option<usize> = args.next().and_then(|a| a.parse().ok());
    let backend = convkit::backend(&engine)?;

    // The official binary batches (`cifar10` also reads the JPEG folder `cifar10-jpg`).
    let data = Locator::from_env();
    let (mut train, mut test) = (
        data.load(DatasetName::Cifar10, Split::Train, None)?,
        data.load(DatasetName::Cifar10, Split::Test, None)?,
    );
    if let Some(n) = limit {
        (train, test) = (train.limit(n), test.limit(n.div_ceil(5)));
    }
    let train = train.normalise(Normalisation::Rescale);
    let test = test.normalise(Normalisation::Rescale);
    let out = std::path::Path::new("runs/cifar10");

    // The tutorial's two models: a dense network with SGD for 5 epochs, a CNN with adam for 10.
    let runs = [
        ("ann", "tutorial-cifar10-ann", Optimizer::sgd(), 5),
        ("cnn", "tutorial-cifar10-cnn", Optimizer::adam(), 10),
    ];
    for (tag, preset, optimizer, tutorial_epochs) in runs {
        let spec = Sequential::preset(preset)?;
        println!("{}", spec.summary()?);
        let compile = Compile::new(optimizer, Loss::SparseCategoricalCrossentropy);
        let mut model = Model::new(spec, compile, backend.as_ref(), 42)?;
        let history = model
            .fit(&train)
            .epochs(epochs.unwrap_or(tutorial_epochs))
            .batch_size(32)
            // As the tutorial: the test data only shows the curves; nothing selects on it.
            .validation_data(&test)
            .run()?;
        let scored = Scored::new(model.evaluate(&test, 256)?)?;
        println!("{tag} on {engine}:\n{}", scored.text());
        convkit::io::write_bytes_atomic(
            &out.join(format!("{tag}-report.txt")),
            scored.text().as_bytes(),
        )?;
        TrainingCurves(&history).save(&out.join(format!("{tag}-history.png")))?;
        if tag == "cnn" {
            SampleGrid::new(&test, 25, Some(&scored.evaluation.predicted))
                .save(&out.join("samples.png"))?;
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}
