//! Where datasets come from. In order: an explicit path; `$CONVKIT_DATA/<name>/`; the user
//! cache dir (`~/.cache/convkit/<name>/`); system locations (Debian's `dataset-fashion-mnist`
//! installs `/usr/share/datasets/fashion-mnist/`); then a download from the canonical mirrors
//! into the cache, checked against a checksum of the decompressed payload (so recompressed
//! copies such as Debian's stay valid) and written atomically.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::Digest as _;

use super::idx::{read_idx_labels_for, LabelsOf};
use super::{read_cifar10_batches, read_idx_images, read_image_folder, Dataset, ImageShape};
use super::{CIFAR10_CLASSES, FASHION_MNIST_CLASSES, MNIST_CLASSES};
use crate::{Error, Result};

/// The datasets convkit knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetName {
    Mnist,
    FashionMnist,
    Cifar10,
}

/// How a dataset's files are laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Four IDX files (train and test images and labels), each raw or gzip.
    Idx,
    /// CIFAR-10's binary batches (`data_batch_1..5.bin`, `test_batch.bin`, optionally under
    /// `cifar-10-batches-bin/`, downloaded as a tar.gz), or an image folder with
    /// `train/<class>/` and `test/<class>/`.
    CifarBatches,
}

/// Everything convkit knows about one named dataset, in one place.
#[derive(Debug)]
pub struct DatasetInfo {
    pub name: DatasetName,
    /// The names `--dataset` accepts; the first is the canonical one.
    pub aliases: &'static [&'static str],
    /// Folder name under a data root.
    pub dir: &'static str,
    /// Other folder names it is found under (`cifar10-jpg`, an image-folder copy).
    pub other_dirs: &'static [&'static str],
    /// Class names, in label order.
    pub classes: &'static [&'static str],
    /// Native image shape, `(height, width, channels)`.
    pub shape: (usize, usize, usize),
    /// Download mirrors, tried in order.
    pub mirrors: &'static [&'static str],
    /// The files a download fetches, with their checksums.
    pub resources: &'static [Resource],
    pub format: Format,
}

/// An IDX dataset's four gzip files with the SHA-256 of each payload.
macro_rules! idx_resources {
    ($($sum:literal),* $(,)?) => {
        &{
            let sums = [$($sum),*];
            [
                Resource::sha256_const("train-images-idx3-ubyte.gz", sums[0]),
                Resource::sha256_const("train-labels-idx1-ubyte.gz", sums[1]),
                Resource::sha256_const("t10k-images-idx3-ubyte.gz", sums[2]),
                Resource::sha256_const("t10k-labels-idx1-ubyte.gz", sums[3]),
            ]
        }
    };
}

/// The table of named datasets, in [`DatasetName`] order.
pub static DATASETS: [DatasetInfo; 3] = [
    DatasetInfo {
        name: DatasetName::Mnist,
        aliases: &["mnist"],
        dir: "mnist",
        other_dirs: &[],
        classes: &MNIST_CLASSES,
        shape: (28, 28, 1),
        mirrors: &[
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ],
        resources: idx_resources![
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ],
        format: Format::Idx,
    },
    DatasetInfo {
        name: DatasetName::FashionMnist,
        aliases: &["fashion-mnist", "fashion_mnist"],
        dir: "fashion-mnist",
        other_dirs: &[],
        classes: &FASHION_MNIST_CLASSES,
        shape: (28, 28, 1),
        mirrors: &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        resources: idx_resources![
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ],
        format: Format::Idx,
    },
    DatasetInfo {
        name: DatasetName::Cifar10,
        aliases: &["cifar10", "cifar-10"],
        dir: "cifar10",
        other_dirs: &["cifar10-jpg"],
        classes: &CIFAR10_CLASSES,
        shape: (32, 32, 3),
        mirrors: &["https://www.cs.toronto.edu/~kriz/"],
        // The authors publish only the archive's MD5; the archive is unpacked after the check.
        resources: &[Resource {
            file: Cow::Borrowed("cifar-10-binary.tar.gz"),
            checksum: Checksum::Md5OfFile(Cow::Borrowed("c32a1d4ab5d03f1284b67883e8d87530")),
        }],
        format: Format::CifarBatches,
    },
];

impl std::str::FromStr for DatasetName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DATASETS
            .iter()
            .find(|d| d.aliases.contains(&s))
            .map(|d| d.name)
            .ok_or_else(|| {
                Error::config(
                    "dataset",
                    format!(
                        "expected {}, found `{s}`",
                        DATASETS
                            .iter()
                            .map(|d| d.aliases[0])
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }
}

impl DatasetName {
    /// Everything convkit knows about it.
    pub fn info(&self) -> &'static DatasetInfo {
        &DATASETS[*self as usize]
    }

    /// Folder name under a data root.
    pub fn dir_name(&self) -> &'static str {
        self.info().dir
    }

    /// The class names, in label order.
    pub fn classes(&self) -> Vec<String> {
        self.info().classes.iter().map(|c| c.to_string()).collect()
    }

    /// Native image shape.
    pub fn shape(&self) -> ImageShape {
        let (h, w, c) = self.info().shape;
        ImageShape::new(h, w, c)
    }

    fn mirrors(&self) -> Vec<String> {
        self.info().mirrors.iter().map(|m| m.to_string()).collect()
    }

    /// The files a download fetches, with their checksums.
    pub fn resources(&self) -> Vec<Resource> {
        self.info().resources.to_vec()
    }
}

const IDX_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];
const CIFAR_TRAIN: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
const CIFAR_TEST: &str = "test_batch.bin";

/// Training or test part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// How a downloaded file is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// SHA-256 of the content after gunzip (of the file itself if it is not gzip), hex.
    Sha256OfPayload(Cow<'static, str>),
    /// MD5 of the file as downloaded, hex.
    Md5OfFile(Cow<'static, str>),
}

/// One file to download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub file: Cow<'static, str>,
    pub checksum: Checksum,
}

impl Resource {
    pub fn sha256_of_payload(file: &str, hex: &str) -> Self {
        Resource {
            file: Cow::Owned(file.into()),
            checksum: Checksum::Sha256OfPayload(Cow::Owned(hex.into())),
        }
    }

    /// [`Resource::sha256_of_payload`] for the dataset table.
    const fn sha256_const(file: &'static str, hex: &'static str) -> Self {
        Resource {
            file: Cow::Borrowed(file),
            checksum: Checksum::Sha256OfPayload(Cow::Borrowed(hex)),
        }
    }

    fn verify(&self, bytes: &[u8]) -> std::result::Result<(), String> {
        let (kind, expected, found) = match &self.checksum {
            Checksum::Sha256OfPayload(hex) => {
                let mut hasher = sha2::Sha256::new();
                if bytes.starts_with(&[0x1f, 0x8b]) {
                    // Hashed as it inflates, and never past the largest payload convkit reads.
                    let dec = flate2::read::MultiGzDecoder::new(bytes);
                    let limit = super::idx::MAX_IDX_BYTES + 16;
                    let inflated = std::io::copy(&mut dec.take(limit + 1), &mut hasher)
                        .map_err(|e| format!("corrupt gzip payload: {e}"))?;
                    if inflated > limit {
                        return Err(format!(
                            "the payload inflates past {limit} bytes, more than any dataset file"
                        ));
                    }
                } else {
                    hasher.update(bytes);
                }
                (
                    "SHA-256 of the payload",
                    hex,
                    crate::io::hex(&hasher.finalize()),
                )
            }
            Checksum::Md5OfFile(hex) => ("MD5", hex, crate::io::hex(&md5::Md5::digest(bytes))),
        };
        if found == expected.as_ref() {
            Ok(())
        } else {
            Err(format!(
                "checksum mismatch: expected {kind} {expected}, found {found}"
            ))
        }
    }
}

/// Most bytes one download may have (the CIFAR-10 archive, the largest, is 163 MiB).
pub const MAX_DOWNLOAD_BYTES: u64 = 256 << 20;
/// A download with no data for this long has stalled and is abandoned.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Download `resource` from the first mirror that serves a verified copy, into `dest_dir`
/// (atomically). Returns the file's path. Each mirror's failure is reported if all fail.
/// Progress goes to stderr: a bar on a terminal, a line at the start and end otherwise.
pub fn download(mirrors: &[String], resource: &Resource, dest_dir: &Path) -> Result<PathBuf> {
    download_with_stall_timeout(mirrors, resource, dest_dir, STALL_TIMEOUT)
}

fn download_with_stall_timeout(
    mirrors: &[String],
    resource: &Resource,
    dest_dir: &Path,
    stall: Duration,
) -> Result<PathBuf> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_per_read(Some(stall))
        .timeout_global(Some(Duration::from_secs(900)))
        .build()
        .into();
    let mut failures = Vec::new();
    for mirror in mirrors {
        let url = format!("{}{}", mirror, resource.file);
        match fetch(&agent, &url, stall).and_then(|bytes| resource.verify(&bytes).map(|_| bytes)) {
            Ok(bytes) => {
                let path = dest_dir.join(resource.file.as_ref());
                crate::io::write_bytes_atomic(&path, &bytes)?;
                return Ok(path);
            }
            Err(message) => failures.push(format!("{url}: {message}")),
        }
    }
    Err(Error::Download {
        url: resource.file.to_string(),
        message: if failures.is_empty() {
            "no mirrors configured".into()
        } else {
            failures.join("; ")
        },
    })
}

fn fetch(agent: &ureq::Agent, url: &str, stall: Duration) -> std::result::Result<Vec<u8>, String> {
    let mut response = agent.get(url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => format!("HTTP status {code}"),
        other => other.to_string(),
    })?;
    let promised = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = promised.filter(|n| *n > MAX_DOWNLOAD_BYTES) {
        return Err(format!(
            "the server offers {n} bytes, more than the {MAX_DOWNLOAD_BYTES} convkit downloads"
        ));
    }
    let progress = Progress::start(url, promised);
    let mut reader = response.body_mut().as_reader().take(MAX_DOWNLOAD_BYTES + 1);
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let read = loop {
        match reader.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                bytes.extend_from_slice(&chunk[..n]);
                progress.advance(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    progress.finish(bytes.len());
    if let Err(e) = &read {
        let text = e.to_string();
        if e.kind() == std::io::ErrorKind::TimedOut || text.to_lowercase().contains("timeout") {
            return Err(format!(
                "stalled after {} bytes, no data for {:.1} s: {text}",
                bytes.len(),
                stall.as_secs_f64()
            ));
        }
    }
    if bytes.len() as u64 > MAX_DOWNLOAD_BYTES {
        return Err(format!(
            "the body runs past {MAX_DOWNLOAD_BYTES} bytes, more than convkit downloads"
        ));
    }
    if let Some(n) = promised {
        if (bytes.len() as u64) < n {
            return Err(format!(
                "truncated: server promised {n} bytes, received {}",
                bytes.len()
            ));
        }
    }
    read.map_err(|e| format!("reading the body: {e}"))?;
    Ok(bytes)
}

/// A download's progress on stderr: an indicatif bar on a terminal; otherwise one line when
/// it starts and one when it ends, so logs and notebooks are not flooded.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines,
}

impl Progress {
    fn start(url: &str, total: Option<u64>) -> Self {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::no_length(),
            };
            bar.set_style(crate::train::bar_style(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ));
            bar.set_message(format!("downloading {url}"));
            Progress::Bar(bar)
        } else {
            let size = total.map(|n| format!(" ({:.1} MB)", n as f64 / 1e6));
            eprintln!("downloading {url}{}", size.unwrap_or_default());
            Progress::Lines
        }
    }
    fn advance(&self, n: usize) {
        if let Progress::Bar(bar) = self {
            bar.inc(n as u64);
        }
    }
    fn finish(&self, received: usize) {
        match self {
            Progress::Bar(bar) => bar.finish_and_clear(),
            Progress::Lines => eprintln!("  received {:.1} MB", received as f64 / 1e6),
        }
    }
}

/// Finds datasets; see the module docs for the order. `Locator::from_env()` is what the CLI
/// uses; tests build one by hand.
#[derive(Debug, Clone)]
pub struct Locator {
    /// `$CONVKIT_DATA`.
    pub data_dir: Option<PathBuf>,
    /// `~/.cache/convkit` (downloads land here).
    pub cache_dir: Option<PathBuf>,
    /// System dataset roots such as `/usr/share/datasets`.
    pub system_dirs: Vec<PathBuf>,
    /// Replaces the canonical mirrors (`$CONVKIT_MIRROR`, comma-separated base URLs).
    pub mirrors: Option<Vec<String>>,
    /// Whether to download when nothing is found locally (`$CONVKIT_OFFLINE=1` turns it off).
    pub download: bool,
}

impl Locator {
    pub fn from_env() -> Self {
        Locator {
            data_dir: std::env::var_os("CONVKIT_DATA")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            cache_dir: dirs::cache_dir().map(|d| d.join("convkit")),
            system_dirs: vec![PathBuf::from("/usr/share/datasets")],
            mirrors: std::env::var("CONVKIT_MIRROR")
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.split(',')
                        .map(|s| format!("{}/", s.trim_end_matches('/')))
                        .collect()
                }),
            download: std::env::var("CONVKIT_OFFLINE")
                .map(|v| v != "1")
                .unwrap_or(true),
        }
    }

    /// Load `split` of dataset `name`, from `explicit` if given (and nowhere else).
    pub fn load(
        &self,
        name: DatasetName,
        split: Split,
        explicit: Option<&Path>,
    ) -> Result<Dataset> {
        let dir = self.find(name, explicit)?;
        load_from_dir(name, split, &dir)
    }

    /// The folder holding dataset `name`, downloading it if needed and allowed.
    pub fn find(&self, name: DatasetName, explicit: Option<&Path>) -> Result<PathBuf> {
        if let Some(path) = explicit {
            return if has_dataset(name, path) {
                Ok(path.to_path_buf())
            } else {
                Err(Error::DatasetNotFound {
                    name: name.dir_name().into(),
                    searched: format!("  {}", path.display()),
                    hint: expected_files(name),
                })
            };
        }
        let mut candidates = Vec::new();
        let mut roots: Vec<&PathBuf> = self.data_dir.iter().collect();
        roots.extend(self.cache_dir.iter());
        roots.extend(self.system_dirs.iter());
        for root in roots {
            candidates.push(root.join(name.dir_name()));
            candidates.extend(name.info().other_dirs.iter().map(|d| root.join(d)));
        }
        if let Some(found) = candidates.iter().find(|c| has_dataset(name, c)) {
            return Ok(found.clone());
        }
        let searched = candidates
            .iter()
            .map(|c| format!("  {}", c.display()))
            .collect::<Vec<_>>()
            .join("\n");
        let cache = match (&self.cache_dir, self.download) {
            (Some(cache), true) => cache.join(name.dir_name()),
            _ => {
                return Err(Error::DatasetNotFound {
                    name: name.dir_name().into(),
                    searched,
                    hint: format!("{}\nSet CONVKIT_DATA to a folder holding `{}/`, or allow downloads (unset CONVKIT_OFFLINE).", expected_files(name), name.dir_name()),
                })
            }
        };
        let mirrors = self.mirrors.clone().unwrap_or_else(|| name.mirrors());
        for resource in name.resources() {
            let path = download(&mirrors, &resource, &cache)?;
            match name.info().format {
                Format::CifarBatches => unpack_cifar(&path, &cache)?,
                Format::Idx => {}
            }
        }
        Ok(cache)
    }
}

fn expected_files(name: DatasetName) -> String {
    match name.info().format {
        Format::CifarBatches => "expected data_batch_1..5.bin and test_batch.bin (optionally under cifar-10-batches-bin/), or an image folder with train/<class>/ and test/<class>/".into(),
        Format::Idx => format!("expected {} (each .gz or raw)", IDX_FILES.join(", ")),
    }
}

fn idx_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [format!("{stem}.gz"), stem.to_string()]
        .into_iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

fn cifar_bin_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| d.join(CIFAR_TEST).is_file() && CIFAR_TRAIN.iter().all(|f| d.join(f).is_file()))
}

fn has_dataset(name: DatasetName, dir: &Path) -> bool {
    match name.info().format {
        Format::CifarBatches => {
            cifar_bin_dir(dir).is_some()
                || (dir.join("train").is_dir() && dir.join("test").is_dir())
        }
        Format::Idx => IDX_FILES.iter().all(|f| idx_file(dir, f).is_some()),
    }
}

fn load_from_dir(name: DatasetName, split: Split, dir: &Path) -> Result<Dataset> {
    match name.info().format {
        Format::CifarBatches => {
            if let Some(bin) = cifar_bin_dir(dir) {
                let files: Vec<PathBuf> = match split {
                    Split::Train => CIFAR_TRAIN.iter().map(|f| bin.join(f)).collect(),
                    Split::Test => vec![bin.join(CIFAR_TEST)],
                };
                read_cifar10_batches(&files)
            } else {
                let part = if split == Split::Train {
                    "train"
                } else {
                    "test"
                };
                read_image_folder(&dir.join(part), name.shape(), Some(&name.classes()))
            }
        }
        Format::Idx => {
            let (img, lab) = match split {
                Split::Train => (IDX_FILES[0], IDX_FILES[1]),
                Split::Test => (IDX_FILES[2], IDX_FILES[3]),
            };
            let img_path = idx_file(dir, img)
                .ok_or_else(|| Error::data(dir, format!("missing {img}[.gz]")))?;
            let lab_path = idx_file(dir, lab)
                .ok_or_else(|| Error::data(dir, format!("missing {lab}[.gz]")))?;
            let (pixels, (n, h, w)) = read_idx_images(&img_path)?;
            let images = LabelsOf {
                images: n,
                file: &img_path,
            };
            let labels = read_idx_labels_for(&lab_path, 10, Some(images))?;
            Dataset::new(pixels, ImageShape::new(h, w, 1), labels, name.classes())
        }
    }
}

fn unpack_cifar(archive: &Path, dest: &Path) -> Result<()> {
    let file = crate::io::open_regular(archive)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entries = tar
        .entries()
        .map_err(|e| Error::format(archive, 0, e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::format(archive, 0, e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| Error::format(archive, 0, e.to_string()))?
            .into_owned();
        let Some(file_name) = path.file_name().map(|f| f.to_string_lossy().into_owned()) else {
            continue;
        };
        if file_name.ends_with(".bin") {
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| Error::io(archive, e))?;
            crate::io::write_bytes_atomic(&dest.join(&file_name), &bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::idx::tests::{gz, idx_images, idx_labels};
    use super::*;

    #[test]
    fn the_dataset_table_is_in_name_order_and_every_alias_parses() {
        for (i, d) in DATASETS.iter().enumerate() {
            assert_eq!(d.name as usize, i, "{} is out of order", d.dir);
            assert_eq!(d.name.info().dir, d.dir);
            for alias in d.aliases {
                assert_eq!(alias.parse::<DatasetName>().unwrap(), d.name);
            }
            assert_eq!(d.classes.len(), 10, "{}", d.dir);
            assert!(
                !d.mirrors.is_empty() && !d.resources.is_empty(),
                "{}",
                d.dir
            );
        }
        let e = "imagenet".parse::<DatasetName>().unwrap_err().to_string();
        assert!(e.contains("mnist, fashion-mnist, cifar10"), "{e}");
    }
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A tiny HTTP/1.1 server on 127.0.0.1 serving `routes` (path → (status, body, claimed
    /// length)); it stops after `requests` connections.
    fn serve(routes: Vec<(&'static str, u16, Vec<u8>, Option<usize>)>, requests: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}/", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(requests) {
                let mut stream = stream.unwrap();
                let mut line = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                reader.read_line(&mut line).unwrap();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap() <= 2 {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let route = routes.iter().find(|r| path.ends_with(r.0));
                let (status, body, claimed) = match route {
                    Some((_, s, b, c)) => (*s, b.clone(), c.unwrap_or(b.len())),
                    None => (404, b"not found".to_vec(), 9),
                };
                // Status 299 stands for a server that sends its headers and half the body,
                // then stalls.
                let (status, stall) = if status == 299 {
                    (200, true)
                } else {
                    (status, false)
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Length: {claimed}\r\nConnection: close\r\n\r\n"
                );
                if stall {
                    let _ = stream.write_all(&body[..body.len() / 2]);
                    let _ = stream.flush();
                    std::thread::sleep(Duration::from_secs(5));
                }
                let _ = stream.write_all(&body);
            }
        });
        base
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        crate::io::hex(&sha2::Sha256::digest(bytes))
    }

    #[test]
    fn download_good_truncated_wrong_checksum_404() {
        let payload = idx_labels(&[1, 2, 3]);
        let good = gz(&payload);
        let base = serve(
            vec![
                ("/good.gz", 200, good.clone(), None),
                (
                    "/trunc.gz",
                    200,
                    good[..good.len() / 2].to_vec(),
                    Some(good.len()),
                ),
                ("/wrong.gz", 200, gz(&idx_labels(&[9])), None),
            ],
            4,
        );
        let dir = tempfile::tempdir().unwrap();
        let sum = sha256_hex(&payload);
        // good: lands atomically, verified on the decompressed payload
        let path = download(
            std::slice::from_ref(&base),
            &Resource::sha256_of_payload("good.gz", &sum),
            dir.path(),
        )
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), good);
        // truncated
        let err = download(
            std::slice::from_ref(&base),
            &Resource::sha256_of_payload("trunc.gz", &sum),
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("truncated: server promised"), "{err}");
        assert!(!dir.path().join("trunc.gz").exists());
        // wrong checksum
        let err = download(
            std::slice::from_ref(&base),
            &Resource::sha256_of_payload("wrong.gz", &sum),
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("checksum mismatch") && err.contains(&sum),
            "{err}"
        );
        assert!(!dir.path().join("wrong.gz").exists());
        // 404
        let err = download(
            &[base],
            &Resource::sha256_of_payload("nothing.gz", &sum),
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("HTTP status 404"), "{err}");
        // no leftover temporary files
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("good.gz")]);
    }

    #[test]
    fn oversized_and_stalled_downloads_stop_early() {
        let payload = idx_labels(&[1, 2, 3]);
        let body = gz(&payload);
        let huge = MAX_DOWNLOAD_BYTES as usize + 1;
        let base = serve(
            vec![
                ("/huge.gz", 200, body.clone(), Some(huge)),
                ("/stall.gz", 299, body, None),
            ],
            2,
        );
        let dir = tempfile::tempdir().unwrap();
        let sum = sha256_hex(&payload);
        let err = download(
            std::slice::from_ref(&base),
            &Resource::sha256_of_payload("huge.gz", &sum),
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("more than the 268435456 convkit downloads"),
            "{err}"
        );
        let start = std::time::Instant::now();
        let err = download_with_stall_timeout(
            &[base],
            &Resource::sha256_of_payload("stall.gz", &sum),
            dir.path(),
            Duration::from_millis(500),
        )
        .unwrap_err()
        .to_string();
        assert!(start.elapsed() < Duration::from_secs(4), "{err}");
        assert!(
            err.contains("stall.gz") && err.contains("stalled after 15 bytes"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn recompressed_copies_stay_valid() {
        let payload = idx_labels(&[4, 5]);
        let r = Resource::sha256_of_payload("x.gz", &sha256_hex(&payload));
        let mut other = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        other.write_all(&payload).unwrap();
        let recompressed = other.finish().unwrap();
        assert_ne!(recompressed, gz(&payload));
        r.verify(&recompressed).unwrap();
        r.verify(&payload).unwrap();
    }

    fn write_idx_dataset(dir: &Path, n: u32, labels_n: usize) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("train-images-idx3-ubyte.gz"),
            gz(&idx_images(n, 28, 28, |i| i as u8)),
        )
        .unwrap();
        std::fs::write(
            dir.join("train-labels-idx1-ubyte"),
            idx_labels(&vec![3; labels_n]),
        )
        .unwrap();
        std::fs::write(
            dir.join("t10k-images-idx3-ubyte.gz"),
            gz(&idx_images(2, 28, 28, |_| 0)),
        )
        .unwrap();
        std::fs::write(
            dir.join("t10k-labels-idx1-ubyte.gz"),
            gz(&idx_labels(&[1, 2])),
        )
        .unwrap();
    }

    fn offline(data: &Path) -> Locator {
        Locator {
            data_dir: Some(data.into()),
            cache_dir: None,
            system_dirs: vec![],
            mirrors: None,
            download: false,
        }
    }

    #[test]
    fn resolution_order_and_errors() {
        let root = tempfile::tempdir().unwrap();
        write_idx_dataset(&root.path().join("data/mnist"), 4, 4);
        let loc = offline(&root.path().join("data"));
        let train = loc.load(DatasetName::Mnist, Split::Train, None).unwrap();
        assert_eq!(
            (train.len(), train.classes.len(), train.shape),
            (4, 10, ImageShape::new(28, 28, 1))
        );
        assert_eq!(
            loc.load(DatasetName::Mnist, Split::Test, None)
                .unwrap()
                .labels,
            vec![1, 2]
        );

        let err = loc
            .load(DatasetName::FashionMnist, Split::Train, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dataset `fashion-mnist` not found") && err.contains("data/fashion-mnist"),
            "{err}"
        );

        let err = loc
            .load(
                DatasetName::Mnist,
                Split::Train,
                Some(&root.path().join("elsewhere")),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("elsewhere"), "{err}");

        write_idx_dataset(&root.path().join("bad/mnist"), 4, 3);
        let err = offline(&root.path().join("bad"))
            .load(DatasetName::Mnist, Split::Train, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("counts disagree") && err.contains("4 images") && err.contains("3 labels"),
            "{err}"
        );
    }

    #[test]
    fn downloads_into_the_cache_when_missing() {
        let files: Vec<(&'static str, Vec<u8>)> = vec![
            (
                "train-images-idx3-ubyte.gz",
                gz(&idx_images(3, 28, 28, |i| (i % 7) as u8)),
            ),
            ("train-labels-idx1-ubyte.gz", gz(&idx_labels(&[0, 1, 2]))),
            (
                "t10k-images-idx3-ubyte.gz",
                gz(&idx_images(1, 28, 28, |_| 9)),
            ),
            ("t10k-labels-idx1-ubyte.gz", gz(&idx_labels(&[5]))),
        ];
        let base = serve(
            files
                .iter()
                .map(|(n, b)| (*n, 200, b.clone(), None))
                .collect(),
            4,
        );
        // The real checksums would not match this fake data: check the plumbing through the
        // Resource-level API with the fake's own checksums, then the Locator's cache path.
        let cache = tempfile::tempdir().unwrap();
        for (name, body) in &files {
            let mut payload = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut payload)
                .unwrap();
            download(
                std::slice::from_ref(&base),
                &Resource::sha256_of_payload(name, &sha256_hex(&payload)),
                &cache.path().join("mnist"),
            )
            .unwrap();
        }
        let loc = Locator {
            data_dir: None,
            cache_dir: Some(cache.path().into()),
            system_dirs: vec![],
            mirrors: None,
            download: false,
        };
        assert_eq!(
            loc.load(DatasetName::Mnist, Split::Train, None)
                .unwrap()
                .labels,
            vec![0, 1, 2]
        );
        // And the Locator itself downloads (here the checksum fails, as the data is fake): the
        // error names the mirror and the mismatch, and nothing is left in the cache.
        let base = serve(
            files
                .iter()
                .map(|(n, b)| (*n, 200, b.clone(), None))
                .collect(),
            1,
        );
        let empty = tempfile::tempdir().unwrap();
        let loc = Locator {
            data_dir: None,
            cache_dir: Some(empty.path().into()),
            system_dirs: vec![],
            mirrors: Some(vec![base]),
            download: true,
        };
        let err = loc
            .load(DatasetName::Mnist, Split::Train, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("127.0.0.1") && err.contains("checksum mismatch"),
            "{err}"
        );
        assert!(!empty
            .path()
            .join("mnist/train-images-idx3-ubyte.gz")
            .exists());
    }
}
