//! A run's data in its three parts — training, validation, test — from a named dataset,
//! generated data (`synthetic`: learnable classes; `random`: the first tutorial's noise with
//! soft targets), or an image folder laid out the way datasets ship:
//!
//! - `DIR/train/<class>/` with `DIR/val/`, `DIR/validation/` or `DIR/valid/`, and/or `DIR/test/`;
//! - `DIR/<class>/` alone, split by a seeded hold-out as Keras'
//!   `image_dataset_from_directory(validation_split=, seed=)` does.
//!
//! Validation data is what model selection (EarlyStopping's restored weights, a "best"
//! checkpoint, search ranking) looks at, so by default it never is the test split: it is the
//! source's own validation folder, or a hold-out of the training data. The Keras tutorials'
//! `validation_data=(x_test, y_test)` stays available as [`Validation::Test`], and says so.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::folder::{class_folders, read_image_folder, read_image_folder_noting};
use super::{random_soft, synthetic, Dataset, DatasetName, ImageShape, Locator, Split};
use crate::spec::thousands;
use crate::{Error, Result};

/// Folder names taken as a validation split, in the order they are looked for.
pub const VALIDATION_FOLDERS: [&str; 3] = ["val", "validation", "valid"];

/// How a run's validation data is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Validation {
    /// The source's own validation folder when it has one; otherwise hold out this fraction of
    /// the training data (0 for none).
    Auto(f32),
    /// Hold out this fraction of the training data, chosen at random from the seed. An error
    /// when the source has its own validation folder (say which one you mean).
    Holdout(f32),
    /// The test split, as the Keras tutorials' `validation_data=(x_test, y_test)`: model
    /// selection then sees the data it is finally scored on.
    Test,
    /// No validation data.
    None,
}

impl Validation {
    /// What the command line's flags choose: the test split (`on_test`), a hold-out of
    /// `split` (none for 0), or by default the source's own validation data, else a tenth.
    pub fn chosen(on_test: bool, split: Option<f32>) -> Self {
        match (on_test, split) {
            (true, _) => Validation::Test,
            (false, Some(0.0)) => Validation::None,
            (false, Some(f)) => Validation::Holdout(f),
            (false, None) => Validation::Auto(0.1),
        }
    }
}

/// What [`open_splits`] reads besides the source: validation, a size limit, the seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitOptions {
    pub validation: Validation,
    /// At most this many images per part, a seeded class-balanced sample ([`Dataset::sample`]).
    pub limit: Option<usize>,
    /// Seeds the hold-out and the samples.
    pub seed: u64,
    /// Resize a named dataset's images to the model's input (what `--image-size` asks for);
    /// without it a size that differs is an error. Folders are always resized, and grey and
    /// RGB are always converted to the model's channels, with a line in the sources.
    pub resize: bool,
}

impl Default for SplitOptions {
    /// A tenth of the training data held out when the source has no validation folder, as
    /// the CLI does; no limit; seed 42.
    fn default() -> Self {
        SplitOptions {
            validation: Validation::Auto(0.1),
            limit: None,
            seed: 42,
            resize: false,
        }
    }
}

/// A run's data. `sources` says in words where each part came from.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Dataset,
    /// What model selection looks at; `None` when there is none.
    pub validation: Option<Dataset>,
    /// What the finished model is scored on; `None` when the source has no test split.
    pub test: Option<Dataset>,
    /// One line per part, e.g. `validation: 6,000 images held out from mnist's training
    /// split (10%, seed 42)`.
    pub sources: Vec<String>,
}

impl Splits {
    /// The data to score the finished model on and its name: the test split, or the
    /// validation data when the source has no test split.
    pub fn evaluation(&self) -> Option<(&Dataset, &'static str)> {
        match (&self.test, &self.validation) {
            (Some(test), _) => Some((test, "test")),
            (None, Some(val)) => Some((val, "validation")),
            (None, None) => None,
        }
    }

    /// [`Splits::evaluation`], else the training data (`"training"`): what a training run
    /// scores its finished model on when the source has neither a test split nor validation
    /// data. That measures how well the model fits, not how well it generalises; the sources
    /// say so.
    pub fn evaluation_or_training(&self) -> (&Dataset, &'static str) {
        self.evaluation().unwrap_or((&self.train, "training"))
    }
}

/// How an image folder given as a source is laid out.
#[derive(Debug, Clone, PartialEq)]
enum FolderLayout {
    /// `train/` with an optional validation folder and an optional `test/`.
    Parts {
        train: PathBuf,
        validation: Option<PathBuf>,
        test: Option<PathBuf>,
    },
    /// Class folders directly under the root, one pool of images.
    Classes(PathBuf),
}

fn folder_layout(root: &Path) -> Result<FolderLayout> {
    if !root.is_dir() {
        return Err(Error::config(
            "dataset",
            format!("expected mnist, fashion-mnist, cifar10, synthetic, random or an image folder, found `{}` (no such folder)", root.display()),
        ));
    }
    let train = root.join("train");
    if !train.is_dir() {
        return Ok(FolderLayout::Classes(root.to_path_buf()));
    }
    let validation = VALIDATION_FOLDERS
        .iter()
        .map(|v| root.join(v))
        .find(|p| p.is_dir());
    let test = Some(root.join("test")).filter(|p| p.is_dir());
    Ok(FolderLayout::Parts {
        train,
        validation,
        test,
    })
}

/// One part read from disk (before hold-outs), with its description.
struct Part {
    data: Dataset,
    from: String,
}

fn sampled(part: Part, limit: Option<usize>, seed: u64) -> Part {
    match limit {
        Some(n) if n < part.data.len() => Part {
            from: format!("{} (a class-balanced sample, seed {seed})", part.from),
            data: part.data.sample(n, seed),
        },
        _ => part,
    }
}

fn describe(what: &str, data: &Dataset, from: &str) -> String {
    format!("{what}: {} images {from}", thousands(data.len()))
}

/// Open a run's training, validation and test data from `source` (what a user types:
/// `mnist`, `fashion-mnist`, `cifar10`, `synthetic`, `random` or a folder path; see the module
/// docs for folder layouts). Images come out in `input`'s shape; `classes` sizes synthetic data.
pub fn open_splits(
    source: impl AsRef<OsStr>,
    input: ImageShape,
    classes: usize,
    options: SplitOptions,
    locator: &Locator,
) -> Result<Splits> {
    let source = Source::new(source.as_ref());
    let SplitOptions {
        validation,
        limit,
        seed,
        resize,
    } = options;
    let (train, own_validation, test) = read_parts(&source, input, classes, seed, locator)?;
    // Sampled first, so that only the images kept are resized.
    let fit = |part: Part| fitted(part, &source.shown, input, resize);
    let sample = |part: Option<Part>| part.map(|p| fit(sampled(p, limit, seed))).transpose();
    let (train, own_validation, test) = (
        fit(sampled(train, limit, seed))?,
        sample(own_validation)?,
        sample(test)?,
    );
    let holdout = |fraction: f32| -> Result<(Dataset, Dataset, String, String)> {
        let (kept, held) = train.data.holdout(fraction, seed)?;
        let share = format!("{:.0}%", fraction * 100.0);
        Ok((
            kept,
            held,
            format!("{}, less the {share} held out for validation", train.from),
            format!("held out from the training data ({share}, seed {seed})"),
        ))
    };
    let mut set_aside = None;
    let (train_data, train_from, validation) = match (validation, own_validation) {
        (Validation::Holdout(_), Some(own)) => {
            return Err(Error::config(
                "validation split",
                format!("`{}` has its own validation data ({}); leave out the hold-out fraction to use it, or remove the folder", source.shown, own.from),
            ))
        }
        (Validation::Auto(_), Some(own)) => (train.data, train.from, Some((own.data, own.from))),
        // The default hold-out steps aside where it would leave an empty part (a handful of
        // images), as Keras trains without validation data when none is asked for.
        (Validation::Auto(f), None)
            if f > 0.0 && f < 1.0 && crate::data::holdout_cut(train.data.len(), f).is_err() =>
        {
            let n = train.data.len();
            let share = format!("{:.0}%", f * 100.0);
            let why = format!("the default {share} hold-out of {n} images would leave an empty part; choose one with --validation-split");
            set_aside = Some(why);
            (train.data, train.from, None)
        }
        (Validation::Auto(f) | Validation::Holdout(f), None) if f > 0.0 => {
            let (kept, held, train_from, held_from) = holdout(f)?;
            (kept, train_from, Some((held, held_from)))
        }
        (Validation::Test, _) => {
            let test = test.as_ref().ok_or_else(|| {
                Error::config(
                    "validation data",
                    format!("`{}` has no test split to validate on", source.shown),
                )
            })?;
            let from = format!("{}: the test data, as the Keras tutorial's validation_data=(x_test, y_test); model selection sees the test split", test.from);
            (train.data, train.from, Some((test.data.clone(), from)))
        }
        (Validation::Auto(f) | Validation::Holdout(f), None) if f < 0.0 || f.is_nan() => {
            return Err(Error::config(
                "validation split",
                format!("expected a fraction in [0, 1), found {f}"),
            ))
        }
        (_, _) => (train.data, train.from, None),
    };
    let mut sources = vec![describe("train", &train_data, &train_from)];
    sources.push(match &validation {
        Some((data, from)) => describe("validation", data, from),
        None => match set_aside {
            Some(why) => format!("validation: none ({why})"),
            None => "validation: none".into(),
        },
    });
    sources.push(match &test {
        Some(part) => describe("test", &part.data, &part.from),
        None if validation.is_some() => {
            "test: none in this source; the finished model is scored on the validation data".into()
        }
        None => "test: none in this source; a finished training run is scored on its training data, which measures fit, not generalisation".into(),
    });
    Ok(Splits {
        train: train_data,
        validation: validation.map(|(data, _)| data),
        test: test.map(|p| p.data),
        sources,
    })
}

/// What a user gave as a dataset: a name, or a folder's path (any bytes, on Unix).
struct Source<'a> {
    path: &'a Path,
    /// The name, when it is one of the generated sources.
    generated: Option<&'a str>,
    /// The dataset it names, if it does.
    named: Option<DatasetName>,
    /// For messages (a path's bytes that are not UTF-8 shown as U+FFFD).
    shown: String,
}

impl<'a> Source<'a> {
    fn new(source: &'a OsStr) -> Self {
        let text = source.to_str();
        Source {
            path: Path::new(source),
            generated: text.filter(|t| GENERATED.contains(t)),
            named: text.and_then(|t| t.parse().ok()),
            shown: Path::new(source).display().to_string(),
        }
    }
}

/// The parts a source has on disk: training, its own validation (folders only) and test.
fn read_parts(
    source: &Source<'_>,
    input: ImageShape,
    classes: usize,
    seed: u64,
    locator: &Locator,
) -> Result<(Part, Option<Part>, Option<Part>)> {
    if let Some(generated) = source.generated {
        let part = |split| -> Result<Part> {
            Ok(Part {
                data: generated_split(generated, split, input, classes, seed)?,
                from: format!("of {generated} {input} data (seed {seed})"),
            })
        };
        return Ok((part(Split::Train)?, None, Some(part(Split::Test)?)));
    }
    if let Some(name) = source.named {
        let source = &source.shown;
        let part = |split: Split| -> Result<Part> {
            let data = locator.load(name, split, None)?;
            let which = match split {
                Split::Train => "training",
                Split::Test => "test",
            };
            Ok(Part {
                data,
                from: format!("from {source}'s {which} split"),
            })
        };
        return Ok((part(Split::Train)?, None, Some(part(Split::Test)?)));
    }
    let read = |dir: &Path, known: Option<&[String]>| -> Result<Part> {
        let (data, left_out) = read_image_folder_noting(dir, input, known)?;
        let from = match left_out {
            Some(note) => format!("from {} ({note})", dir.display()),
            None => format!("from {}", dir.display()),
        };
        Ok(Part { data, from })
    };
    match folder_layout(source.path)? {
        FolderLayout::Classes(dir) => Ok((read(&dir, None)?, None, None)),
        FolderLayout::Parts {
            train,
            validation,
            test,
        } => {
            let train = read(&train, None)?;
            let known = Some(train.data.classes.as_slice());
            let validation = validation.map(|d| read(&d, known)).transpose()?;
            let test = test.map(|d| read(&d, known)).transpose()?;
            Ok((train, validation, test))
        }
    }
}

/// The sources made rather than read.
const GENERATED: [&str; 2] = ["synthetic", "random"];

/// A split of generated data in `input`'s shape: `synthetic`, 2,000 training and 500 test
/// images of `classes` learnable classes; `random`, the first tutorial's 100 images of noise
/// with soft targets ([`random_soft`]), and 100 more as a test split (the tutorial has none).
fn generated_split(
    source: &str,
    split: Split,
    input: ImageShape,
    classes: usize,
    seed: u64,
) -> Result<Dataset> {
    let offset = match split {
        Split::Train => 0,
        Split::Test => 1,
    };
    let seed = seed.wrapping_add(offset);
    match (source, split) {
        ("random", _) => random_soft(100, input, seed),
        (_, Split::Train) => synthetic(2000, input, classes.max(2), seed),
        (_, Split::Test) => synthetic(500, input, classes.max(2), seed),
    }
}

/// `data` brought to the model's `input`: grey and RGB converted, and with `resize` the size
/// too; `from` then says so. A size that differs without `resize` is an error naming the flag.
fn fit_to_input(
    data: Dataset,
    from: &mut String,
    source: &str,
    input: ImageShape,
    resize: bool,
) -> Result<Dataset> {
    let shape = data.shape;
    if shape == input {
        return Ok(data);
    }
    if (shape.height, shape.width) != (input.height, input.width) && !resize {
        return Err(Error::Shape {
            expected: format!("{input} images (the model's input)"),
            found: format!(
                "{source} images of {shape}; resize them on load with --image-size {} {}, \
                 or pick a model made for {source}",
                input.height, input.width
            ),
        });
    }
    let data = data.fitted_to(input)?;
    let colour = |c: usize| if c == 1 { "grey" } else { "RGB" };
    let mut changes = Vec::new();
    if (shape.height, shape.width) != (input.height, input.width) {
        changes.push(format!(
            "resized from {}×{} to {}×{} (bilinear)",
            shape.height, shape.width, input.height, input.width
        ));
    }
    if shape.channels != input.channels {
        changes.push(format!(
            "converted from {} to {}",
            colour(shape.channels),
            colour(input.channels)
        ));
    }
    from.push_str(&format!(", {}", changes.join(" and ")));
    Ok(data)
}

fn fitted(mut part: Part, source: &str, input: ImageShape, resize: bool) -> Result<Part> {
    part.data = fit_to_input(part.data, &mut part.from, source, input, resize)?;
    Ok(part)
}

/// Open one split of a dataset by what a user types: `mnist`, `fashion-mnist`, `cifar10`,
/// `synthetic`, `random`, or an image folder (see the module docs; a folder of class folders is all
/// training data). Images come out in `input`'s shape: folders are resized and converted;
/// named datasets are converted between grey and RGB but must already have its size.
/// `classes` sizes synthetic data (2 for a sigmoid head).
pub fn open(
    source: impl AsRef<OsStr>,
    split: Split,
    input: ImageShape,
    classes: usize,
    seed: u64,
    locator: &Locator,
) -> Result<Dataset> {
    let source = Source::new(source.as_ref());
    if let Some(generated) = source.generated {
        return generated_split(generated, split, input, classes, seed);
    }
    if let Some(name) = source.named {
        let data = locator.load(name, split, None)?;
        return fit_to_input(data, &mut String::new(), &source.shown, input, false);
    }
    match (folder_layout(source.path)?, split) {
        (FolderLayout::Classes(dir), Split::Train) => read_image_folder(&dir, input, None),
        (FolderLayout::Parts { train, .. }, Split::Train) => read_image_folder(&train, input, None),
        (
            FolderLayout::Parts {
                train,
                test: Some(test),
                ..
            },
            Split::Test,
        ) => {
            let names: Vec<String> = class_folders(&train)?.into_iter().map(|(_, n)| n).collect();
            read_image_folder(&test, input, Some(&names))
        }
        (_, Split::Test) => Err(Error::data(
            source.path,
            "no test/ folder: this image folder has no test split",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `root/<part>/<class>/<i>.png` for every (part, class, count).
    fn write_folder(root: &Path, layout: &[(&str, &str, usize)]) {
        for (part, class, n) in layout {
            let dir = root.join(part).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..*n {
                image::GrayImage::from_pixel(6, 6, image::Luma([(i * 7 % 256) as u8]))
                    .save(dir.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }

    fn offline() -> Locator {
        Locator {
            data_dir: None,
            cache_dir: None,
            system_dirs: vec![],
            mirrors: None,
            download: false,
        }
    }

    fn open_with(root: &Path, validation: Validation, limit: Option<usize>) -> Result<Splits> {
        let options = SplitOptions {
            validation,
            limit,
            seed: 7,
            resize: false,
        };
        open_splits(
            root.to_str().unwrap(),
            ImageShape::new(4, 4, 1),
            2,
            options,
            &offline(),
        )
    }

    #[test]
    fn train_and_val_folders_without_test() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(
            dir.path(),
            &[("train", "cat", 5), ("train", "dog", 4), ("val", "cat", 2)],
        );
        let splits = open_with(dir.path(), Validation::Auto(0.1), None).unwrap();
        assert_eq!(splits.train.len(), 9);
        assert_eq!(splits.validation.as_ref().unwrap().labels, vec![0, 0]);
        assert!(splits.test.is_none());
        assert_eq!(splits.evaluation().unwrap().1, "validation");
        assert!(splits.sources[1].contains("val"), "{:?}", splits.sources);
        assert!(
            splits.sources[2].contains("scored on the validation data"),
            "{:?}",
            splits.sources
        );
        // An explicit hold-out beside a validation folder is ambiguous.
        let err = open_with(dir.path(), Validation::Holdout(0.2), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has its own validation data"), "{err}");
        // There is no test split to validate on.
        let err = open_with(dir.path(), Validation::Test, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no test split"), "{err}");
    }

    #[test]
    fn one_folder_of_classes_is_held_out_by_seed() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), &[("", "a", 10), ("", "b", 10)]);
        let splits = open_with(dir.path(), Validation::Auto(0.25), None).unwrap();
        let val = splits.validation.as_ref().unwrap();
        assert_eq!((splits.train.len(), val.len()), (15, 5));
        assert!(splits.test.is_none());
        assert!(
            splits.sources[1].contains("25%, seed 7"),
            "{:?}",
            splits.sources
        );
        // The same seed gives the same hold-out; it is not simply the last images.
        let again = open_with(dir.path(), Validation::Auto(0.25), None).unwrap();
        assert_eq!(again.validation.unwrap().images, val.images);
        assert_ne!(val.labels, vec![1; 5]);
        // No validation at all: nothing to score on, and the caller is told.
        let none = open_with(dir.path(), Validation::None, None).unwrap();
        assert!(none.evaluation().is_none());
        assert_eq!(none.train.len(), 20);
        let err = open_with(dir.path(), Validation::Auto(1.0), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("(0, 1)"), "{err}");
    }

    #[test]
    fn the_default_hold_out_steps_aside_for_a_handful_of_images() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), &[("", "a", 2), ("", "b", 2)]);
        let splits = open_with(dir.path(), Validation::Auto(0.1), None).unwrap();
        assert_eq!(splits.train.len(), 4);
        assert!(splits.validation.is_none());
        assert!(
            splits.sources[1]
                .contains("default 10% hold-out of 4 images would leave an empty part"),
            "{:?}",
            splits.sources
        );
        assert_eq!(splits.evaluation_or_training().1, "training");
        assert!(splits.sources[2].contains("scored on its training data"));
        // A split the user asked for that leaves nothing is still an error.
        let err = open_with(dir.path(), Validation::Holdout(0.1), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves an empty part"), "{err}");
    }

    #[test]
    fn limit_is_a_balanced_sample_of_every_part() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(
            dir.path(),
            &[
                ("train", "a", 30),
                ("train", "b", 30),
                ("train", "c", 3),
                ("test", "a", 8),
                ("test", "b", 8),
            ],
        );
        let splits = open_with(dir.path(), Validation::None, Some(12)).unwrap();
        let count = |d: &Dataset, c: u32| d.labels.iter().filter(|l| **l == c).count();
        // Class c runs out after 3; the other two share the rest.
        let train = &splits.train;
        assert_eq!(
            (count(train, 0), count(train, 1), count(train, 2)),
            (5, 4, 3),
            "{:?}",
            train.labels
        );
        let test = splits.test.as_ref().unwrap();
        assert_eq!((count(test, 0), count(test, 1)), (6, 6));
        assert!(splits.sources[0].contains("class-balanced sample"));
        // `test` doubles as validation only when asked.
        let literal = open_with(dir.path(), Validation::Test, None).unwrap();
        assert_eq!(literal.validation.as_ref().unwrap().len(), 16);
        assert!(literal.sources[1].contains("model selection sees the test split"));
        assert_eq!(literal.evaluation().unwrap().1, "test");
    }

    #[test]
    fn single_split_open_follows_the_layouts() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), &[("", "a", 2), ("", "b", 1)]);
        let source = dir.path().to_str().unwrap();
        let shape = ImageShape::new(4, 4, 1);
        assert_eq!(
            open(source, Split::Train, shape, 2, 0, &offline())
                .unwrap()
                .len(),
            3
        );
        let err = open(source, Split::Test, shape, 2, 0, &offline())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no test/ folder"), "{err}");
        let err = open("/no/such/place", Split::Train, shape, 2, 0, &offline())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such folder"), "{err}");
    }

    #[test]
    fn named_and_synthetic_sources() {
        let splits = open_splits(
            "synthetic",
            ImageShape::new(4, 4, 1),
            3,
            SplitOptions::default(),
            &offline(),
        )
        .unwrap();
        assert_eq!(
            (
                splits.train.len(),
                splits.validation.as_ref().unwrap().len(),
                splits.test.as_ref().unwrap().len()
            ),
            (1800, 200, 500)
        );
        let err = open_splits(
            "mnist",
            ImageShape::new(28, 28, 1),
            10,
            SplitOptions::default(),
            &offline(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dataset `mnist` not found"), "{err}");
    }

    #[test]
    fn named_data_is_converted_and_resized_only_when_asked() {
        // Two grey 2×2 images: one flat, one a left/right edge.
        let grey = Dataset::new(
            vec![100, 100, 100, 100, 0, 200, 0, 200],
            ImageShape::new(2, 2, 1),
            vec![0, 1],
            vec!["flat".into(), "edge".into()],
        )
        .unwrap();
        // Channels alone: converted without the flag, and said.
        let mut from = String::from("from mnist");
        let rgb = fit_to_input(
            grey.clone(),
            &mut from,
            "mnist",
            ImageShape::new(2, 2, 3),
            false,
        )
        .unwrap();
        assert_eq!(from, "from mnist, converted from grey to RGB");
        assert_eq!(&rgb.images[..12], &[100; 12]);
        assert_eq!(&rgb.images[12..18], &[0, 0, 0, 200, 200, 200]);
        assert_eq!(
            (rgb.labels.clone(), rgb.classes.clone()),
            (grey.labels.clone(), grey.classes.clone())
        );
        // Another size: refused without resize, naming the flag ...
        let target = ImageShape::new(4, 4, 1);
        let err = fit_to_input(grey.clone(), &mut String::new(), "mnist", target, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--image-size 4 4") && err.contains("2×2×1"),
            "{err}"
        );
        // ... and resized with it: flat stays flat, the edge keeps its sides.
        let mut from = String::new();
        let big = fit_to_input(grey, &mut from, "mnist", target, true).unwrap();
        assert_eq!(from, ", resized from 2×2 to 4×4 (bilinear)");
        assert_eq!(big.shape, target);
        assert_eq!(&big.images[..16], &[100; 16]);
        let edge = &big.images[16..];
        assert!(
            edge[0] < 60 && edge[3] > 140 && edge[0] == edge[12],
            "{edge:?}"
        );
    }
}
