//! Fuzzing on the stable toolchain: a seeded mutation loop over valid inputs, one target per
//! parser (IDX raw and gzip, CIFAR-10 batches, PNG and JPEG images, safetensors checkpoints
//! with their metadata, PyTorch state dicts, spec JSON, search TOML, a run's command.json).
//!
//! Each target starts from valid seed inputs made here (so no dataset or weight file is
//! committed), mutates them (bit flips, interesting bytes, cuts, splices, duplicated and
//! inserted runs, and for gzip the payload before recompression) and feeds every mutant to the
//! parser. A mutant fails the run when the parser panics, grows the heap by more than 512 MiB,
//! or takes longer than 10 s; it is saved under `target/fuzz-failures/` to reproduce. A mutant
//! that asks for more than 1 GiB at once aborts the process (the allocator refuses it); the
//! input being parsed is always in `target/fuzz-work/`.
//!
//! `CONVKIT_FUZZ_SECONDS` sets the time per target (default 3, what `cargo xtask test` runs),
//! `CONVKIT_FUZZ_TARGETS` (comma-separated names) picks targets, e.g. to run halves in parallel;
//! `cargo xtask fuzz` runs it longer in a release build. Why not cargo-fuzz or afl: both need
//! nightly or an instrumented build outside cargo's registry crates; this loop finds the
//! panics and unbounded allocations the parsers are prone to with nothing but stable Rust.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use convkit_core::data::{
    load_image, read_cifar10_batches, read_idx_images, read_idx_labels, ImageShape,
};
use convkit_core::pytorch::FlattenOrder;
use convkit_core::run::CommandRecord;
use convkit_core::search::SearchConfig;
use convkit_core::{Checkpoint, CheckpointMeta, Compile, Dense, Sequential};
use rand::{Rng, SeedableRng};

/// Counts live heap bytes and their peak, so a mutant that makes a parser allocate gigabytes
/// is caught. The counts are signed and only their growth during one parse is read: with
/// `-C prefer-dynamic` (as the tests build) the standard library may free memory that it did
/// not allocate through this allocator.
struct Tracking;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
/// A single allocation larger than this is refused (null, which aborts the process): far above
/// any parser's need, and the input that asked for it is in `target/fuzz-work/`.
const MEMORY_LIMIT: usize = 1 << 30;

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MEMORY_LIMIT {
            return std::ptr::null_mut();
        }
        let size = layout.size() as isize;
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(live, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

type Parse = fn(&Path) -> bool;

/// One parser under test, with the seeds it starts from and how a file is named.
struct Target {
    name: &'static str,
    file_name: &'static str,
    seeds: Vec<Vec<u8>>,
    /// Whether to also mutate the gzip payload and recompress it.
    gzip: bool,
    parse: Parse,
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(1 << 20)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

fn idx(magic: u32, dims: &[u32], fill: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    let n: u32 = dims.iter().product();
    b.extend((0..n as usize).map(fill));
    b
}

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Flatten and a Dense of 3 softmax units on 4×4 grey images.
fn tiny_spec() -> Sequential {
    Sequential::new(4, 4, 1)
        .flatten()
        .add(Dense::new(3).activation(convkit_core::Activation::Softmax))
}

/// [`tiny_spec`]'s weights as PyTorch's `nn.Sequential(Flatten, Linear)` state dict.
fn state_dict_bytes() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
            .collect()
    };
    let (weight, bias) = (bytes(3 * 16), bytes(3));
    let tensors = [
        (
            "1.weight",
            TensorView::new(Dtype::F32, vec![3, 16], &weight).unwrap(),
        ),
        (
            "1.bias",
            TensorView::new(Dtype::F32, vec![3], &bias).unwrap(),
        ),
    ];
    safetensors::tensor::serialize(tensors, None).unwrap()
}

fn checkpoint_bytes() -> Vec<u8> {
    let spec = tiny_spec();
    let checkpoint = Checkpoint {
        weights: convkit_core::init::glorot_uniform(&spec, 1).unwrap(),
        spec,
        compile: Compile::new(
            convkit_core::compile::Optimizer::adam(),
            convkit_core::compile::Loss::SparseCategoricalCrossentropy,
        ),
        meta: CheckpointMeta {
            classes: vec!["a".into(), "b".into(), "c".into()],
            ..Default::default()
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.safetensors");
    checkpoint.save(&path).unwrap();
    std::fs::read(path).unwrap()
}

fn targets() -> Vec<Target> {
    let images = idx(0x803, &[3, 4, 5], |i| i as u8);
    let labels = idx(0x801, &[6], |i| (i % 10) as u8);
    let mut cifar = vec![3u8];
    cifar.extend((0..3072).map(|i| (i % 251) as u8));
    let spec = Sequential::preset("tutorial-mnist").unwrap().to_json();
    let toml = "model = \"tutorial-mnist\"\ndataset = \"mnist\"\nepochs = 1\nlimit = 600\nvalidation_split = 0.2\nstrategy = \"random\"\nseed = 3\n[space]\noptimizer = [\"adam\", \"sgd\"]\nlearning_rate = [0.001, 0.01]\nbatch_size = [32, 64]\nfilters = [16, 32]\ndropout = [0.0, 0.25]\n";
    vec![
        Target {
            name: "idx-images",
            file_name: "images-idx3-ubyte",
            seeds: vec![images.clone(), gz(&images)],
            gzip: true,
            parse: |p| read_idx_images(p).is_ok(),
        },
        Target {
            name: "idx-labels",
            file_name: "labels-idx1-ubyte",
            seeds: vec![labels.clone(), gz(&labels)],
            gzip: true,
            parse: |p| read_idx_labels(p, 10).is_ok(),
        },
        Target {
            name: "cifar10",
            file_name: "data_batch_1.bin",
            seeds: vec![cifar.clone(), [cifar.clone(), cifar].concat()],
            gzip: false,
            parse: |p| read_cifar10_batches(&[p]).is_ok(),
        },
        Target {
            name: "image",
            file_name: "image",
            seeds: vec![
                encoded(image::ImageFormat::Png),
                encoded(image::ImageFormat::Jpeg),
            ],
            gzip: false,
            parse: |p| load_image(p, ImageShape::new(8, 8, 3)).is_ok(),
        },
        Target {
            name: "checkpoint",
            file_name: "model.safetensors",
            seeds: vec![checkpoint_bytes()],
            gzip: false,
            parse: |p| Checkpoint::load(p).is_ok(),
        },
        Target {
            name: "spec-json",
            file_name: "model.json",
            seeds: vec![spec.into_bytes()],
            gzip: false,
            parse: |p| Sequential::load_json(p).is_ok(),
        },
        Target {
            name: "state-dict",
            file_name: "state_dict.safetensors",
            seeds: vec![state_dict_bytes()],
            gzip: false,
            parse: |p| {
                let spec = tiny_spec();
                convkit_core::pytorch::weights_from_state_dict(
                    p,
                    &spec,
                    FlattenOrder::ChannelsFirst,
                )
                .is_ok()
            },
        },
        Target {
            name: "command-json",
            file_name: "command.json",
            seeds: vec![
                br#"{"cwd":"/tmp","args":["convkit","train",{"unix_bytes":[114,255]}]}"#.to_vec(),
            ],
            gzip: false,
            parse: |p| CommandRecord::load(p.parent().expect("a folder")).is_ok(),
        },
        Target {
            name: "search-toml",
            file_name: "space.toml",
            seeds: vec![toml.as_bytes().to_vec()],
            gzip: false,
            parse: |p| {
                SearchConfig::from_toml(p)
                    .map(|c| c.trials(1000).count())
                    .is_ok()
            },
        },
    ]
}

/// Bytes that break parsers: zero, boundaries of signed and unsigned bytes, all ones.
const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xfe, 0xff, b'9', b'-'];

fn mutate(input: &[u8], rng: &mut rand_chacha::ChaCha8Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = out.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
            2 if len > 0 => out.truncate(rng.random_range(0..len)),
            3 if len > 0 => {
                // A big-endian word set to a huge or boundary value (sizes in headers).
                let i = rng.random_range(0..len);
                let word: u32 =
                    [u32::MAX, 0x7fff_ffff, 0x8000_0000, 1 << 24, 0][rng.random_range(0..5)];
                for (k, b) in word.to_be_bytes().into_iter().enumerate() {
                    if let Some(slot) = out.get_mut(i + k) {
                        *slot = b;
                    }
                }
            }
            4 if len > 0 => {
                let (a, b) = (rng.random_range(0..len), rng.random_range(0..len));
                let (a, b) = (a.min(b), a.max(b));
                let run = out[a..b].to_vec();
                let at = rng.random_range(0..=len);
                out.splice(at..at, run);
            }
            5 if len > 0 => {
                let (a, b) = (rng.random_range(0..len), rng.random_range(0..len));
                out.drain(a.min(b)..a.max(b));
            }
            6 => {
                let at = rng.random_range(0..=len);
                let byte = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let n = rng.random_range(1..64);
                out.splice(at..at, std::iter::repeat_n(byte, n));
            }
            _ => {
                if len > 0 {
                    let i = rng.random_range(0..len);
                    out[i] = rng.random();
                }
            }
        }
        if out.len() > 1 << 20 {
            out.truncate(1 << 20);
        }
    }
    out
}

/// Where the input being parsed is written: the workspace's `target/fuzz-work/`.
fn work_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-work")
}

/// Fuzz one target for `budget`; returns the number of inputs run and the failures.
fn fuzz(target: &Target, budget: Duration, seed: u64, dir: &Path) -> (u64, Vec<String>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let path = dir.join(target.file_name);
    let failures_dir = work_dir().join("../fuzz-failures");
    let mut failures = Vec::new();
    let start = Instant::now();
    let mut runs = 0u64;
    let mut corpus = target.seeds.clone();
    while start.elapsed() < budget && failures.len() < 5 {
        let parent = &corpus[rng.random_range(0..corpus.len())];
        let input = match (target.gzip, gunzip(parent)) {
            // Mutate the payload of a gzip seed half the time, so the reader sees valid
            // compression around hostile content.
            (true, Some(payload)) if rng.random_bool(0.5) => gz(&mutate(&payload, &mut rng)),
            _ => mutate(parent, &mut rng),
        };
        std::fs::write(&path, &input).unwrap();
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let before = LIVE.load(Ordering::Relaxed);
        let began = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (target.parse)(&path)));
        let took = began.elapsed();
        let peak = (PEAK.load(Ordering::Relaxed) - before).max(0) as usize;
        runs += 1;
        let problem = match outcome {
            Err(_) => Some("panicked".to_string()),
            Ok(_) if took > Duration::from_secs(10) => Some(format!("took {took:?}")),
            Ok(_) if peak > MEMORY_LIMIT / 2 => Some(format!("allocated {peak} bytes")),
            // A mutant the parser accepts becomes a parent too, so the loop goes deeper.
            Ok(true) if corpus.len() < 64 => {
                corpus.push(input.clone());
                None
            }
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            std::fs::create_dir_all(&failures_dir).unwrap();
            let saved = failures_dir.join(format!("{}-{runs}", target.name));
            std::fs::write(&saved, &input).unwrap();
            failures.push(format!(
                "{}: {problem}; input saved to {}",
                target.name,
                saved.display()
            ));
        }
    }
    (runs, failures)
}

#[test]
fn parsers_survive_mutated_inputs() {
    let seconds: f64 = std::env::var("CONVKIT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let seed: u64 = std::env::var("CONVKIT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // The parsers' own panics are the finding; keep their messages out of the way.
    std::panic::set_hook(Box::new(|_| {}));
    let only: Option<Vec<String>> = std::env::var("CONVKIT_FUZZ_TARGETS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    // Built once: making the checkpoint seed writes a file.
    let targets = targets();
    let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    if let Some(unknown) = only.iter().flatten().find(|n| !names.contains(&n.as_str())) {
        panic!("CONVKIT_FUZZ_TARGETS names `{unknown}`; the targets are {names:?}");
    }
    let dir = work_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == target.name))
        {
            continue;
        }
        // Every seed must parse, or the loop would only test the error path.
        for (k, s) in target.seeds.iter().enumerate() {
            let path = dir.join(target.file_name);
            std::fs::write(&path, s).unwrap();
            assert!(
                (target.parse)(&path),
                "{}: seed {k} does not parse",
                target.name
            );
        }
        let (runs, found) = fuzz(
            target,
            Duration::from_secs_f64(seconds),
            seed.wrapping_add(i as u64),
            &dir,
        );
        println!(
            "fuzz {}: {runs} inputs in {seconds} s, {} failure(s)",
            target.name,
            found.len()
        );
        failures.extend(found);
    }
    let _ = std::panic::take_hook();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
