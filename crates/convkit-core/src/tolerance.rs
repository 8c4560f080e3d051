//! Agreement tolerances, in one place: what `compare` accepts between engines and what the
//! conformance suite (`tests/`) accepts between each engine and the f64 reference.
//!
//! The first two are exact detectors: the same weights and batch must give the same
//! probabilities and, after one SGD step, the same weights up to float rounding. The one-step
//! check uses SGD whatever `--optimizer` says: Adam and RMSprop divide each gradient by its
//! own magnitude, so rounding noise in a near-zero gradient becomes a step of up to `lr`.
//! Their update rules are checked exactly, per engine, by the conformance suite. The rest are
//! sanity bounds on whole runs, which drift apart by rounding over thousands of steps (most
//! with adaptive optimizers, and on borderline images).

/// Forward probabilities at initialisation, max abs.
pub const FORWARD: f64 = 1e-4;
/// Every weight after one SGD step (lr 0.01), max abs.
pub const ONE_STEP: f64 = 1e-5;
/// Training loss of each epoch, abs.
pub const EPOCH_LOSS: f64 = 0.05;
/// Final test accuracy, abs.
pub const ACCURACY: f64 = 0.02;
/// Share of test predictions that must match the reference's.
pub const PREDICTION_AGREEMENT: f64 = 0.90;
/// Share of confusion-matrix counts that may move between cells.
pub const CONFUSION_MOVED: f64 = 0.05;
/// The loss of one batch against the f64 reference, abs (conformance; compare's engines
/// agree with each other through [`ONE_STEP`] and [`EPOCH_LOSS`]).
pub const BATCH_LOSS: f64 = 1e-5;
