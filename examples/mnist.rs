//! The README's pipeline: `cargo run --release --example mnist` (needs MNIST; see the README).

use convkit::prelude::*;

fn main() -> convkit::Result<()> {
    let backend = convkit::backend("candle-cpu")?;
    let data = Locator::from_env(); // $CONVKIT_DATA, ~/.cache/convkit, /usr/share/datasets, download
    let full = data
        .load(DatasetName::Mnist, Split::Train, None)?
        .normalise(Normalisation::Rescale);
    // Validation data for EarlyStopping: a seeded tenth of train, never the test split.
    let (train, val) = full.holdout(0.1, 42)?;
    let test = data
        .load(DatasetName::Mnist, Split::Test, None)?
        .normalise(Normalisation::Rescale);

    // Or build it layer by layer: Sequential::new(28, 28, 1).add(Conv2D::new(32, 3).activation(Activation::Relu)).max_pool(2)...
    let spec = Sequential::preset("tutorial-mnist")?;
    println!("{}", spec.summary()?);

    let compile = Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy);
    let mut model = Model::new(spec, compile, backend.as_ref(), 42)?; // glorot-uniform, seeded, made in core
    let history = model
        .fit(&train)
        .epochs(5)
        .batch_size(32)
        .validation_data(&val)
        .callback(EarlyStopping::new(Monitor::ValLoss, 2).restore_best_weights(true))
        .run()?;

    let scored = Scored::new(model.evaluate(&test, 256)?)?; // loss, accuracy, confusion matrix, report
    println!("{}", scored.text());
    TrainingCurves(&history).save("history.png".as_ref())?;
    ConfusionHeatmap::new(&scored.confusion).save("confusion_matrix.svg".as_ref())?;
    model
        .checkpoint(CheckpointMeta {
            classes: train.classes.clone(),
            ..Default::default()
        })?
        .save("model.safetensors".as_ref())?;
    Ok(())
}
