//! Atomic file output: everything convkit writes goes to a temporary file in the target's
//! folder, is synced, renamed into place, and the folder synced, so a crash or a full disk
//! never leaves a half-written file and the previous version stays until the new one is whole.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Write `path` atomically; `write` fills the temporary file.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&mut std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".convkit-").suffix(".tmp");
    // As any new file: 0666 less the umask, so a group can read a shared run (tempfile's
    // default, 0600, would keep every output to its owner).
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    {
        let mut out = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut out).map_err(|e| Error::io(path, e))?;
        out.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    // The rename is only durable once the folder's entry is on disk too.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Write bytes to `path` atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// An advisory lock on a run folder, held for the life of a run, so that two processes never
/// write one folder (one would delete or resume the other's backup). It is the folder's
/// `.convkit-lock` file, holding the owner's process id; the lock goes with the process, so a
/// killed run leaves nothing to clean up (the file stays, unlocked).
#[derive(Debug)]
pub struct FolderLock {
    _file: std::fs::File,
}

impl FolderLock {
    pub const FILE: &'static str = ".convkit-lock";

    /// Lock `dir` (made if missing), or say which process holds it.
    pub fn acquire(dir: &Path) -> Result<FolderLock> {
        Self::acquire_file(dir, Self::FILE.into())
    }

    /// Lock the one file `name` in `dir` that this process writes, where processes share a
    /// folder but not their files (a search's parts, each with its own log): its lock file
    /// is `.convkit-lock-<name>`.
    pub fn acquire_for(dir: &Path, name: &str) -> Result<FolderLock> {
        Self::acquire_file(dir, format!("{}-{name}", Self::FILE))
    }

    fn acquire_file(dir: &Path, lock: String) -> Result<FolderLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(&lock);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                let owner = match owner.trim() {
                    "" => "another process".to_string(),
                    pid => format!("process {pid}"),
                };
                return Err(Error::data(
                    dir,
                    format!("{owner} is running in this folder (it holds {lock}); wait for it to finish, or give another --out"),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io(&path, e))?;
        Ok(FolderLock { _file: file })
    }
}

/// Remove the temporary files (`.convkit-*.tmp`) that a write killed before its rename left
/// in `dir`; the number removed. Call it with the folder locked, so no write is under way.
pub fn remove_stale_temporaries(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".convkit-") && name.ends_with(".tmp") && entry.path().is_file() {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// `path` opened for reading, when it is a regular file (a symbolic link is followed; a loop
/// of them is the system's error). A FIFO, socket or device is refused, naming what it is:
/// reading one could wait forever (a FIFO nobody writes) or never end (`/dev/zero`).
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a folder"
        } else {
            "a FIFO, socket or device"
        };
        return Err(Error::data(
            path,
            format!("expected a regular file, found {what}"),
        ));
    }
    std::fs::File::open(path).map_err(|e| Error::io(path, e))
}

/// `bytes` as lower-case hexadecimal, two digits a byte (how checksums are written).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of the regular file `path` ([`open_regular`]), at most `limit` of them: a larger
/// file is an error before it is read, and reading stops at the size the file had when
/// opened, so one that grows meanwhile cannot take more memory.
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path)?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if size > limit {
        return Err(Error::data(
            path,
            format!("expected at most {limit} bytes, the file has {size}"),
        ));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(size)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Read a text file of at most `limit` bytes ([`read_capped`]).
pub fn read_to_string_capped(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_capped(path, limit)?)
        .map_err(|e| Error::data(path, format!("expected UTF-8 text: {e}")))
}

/// Serde for paths and arguments that keeps every byte (`#[serde(with = "..")]`): UTF-8 as a
/// JSON string, anything else (Unix paths are bytes) as `{"unix_bytes": [..]}`.
pub mod os_text {
    use std::ffi::{OsStr, OsString};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Text {
        Utf8(String),
        Bytes { unix_bytes: Vec<u8> },
    }

    impl Text {
        fn of(value: &OsStr) -> Self {
            match value.to_str() {
                Some(text) => Text::Utf8(text.to_string()),
                None => Text::Bytes {
                    unix_bytes: value.as_encoded_bytes().to_vec(),
                },
            }
        }

        fn os_string<E: serde::de::Error>(self) -> Result<OsString, E> {
            match self {
                Text::Utf8(text) => Ok(text.into()),
                #[cfg(unix)]
                Text::Bytes { unix_bytes } => {
                    Ok(std::os::unix::ffi::OsStringExt::from_vec(unix_bytes))
                }
                #[cfg(not(unix))]
                Text::Bytes { .. } => Err(E::custom("a Unix path of bytes that are not UTF-8")),
            }
        }
    }

    pub fn serialize<S: Serializer>(value: &impl AsRef<OsStr>, s: S) -> Result<S::Ok, S::Error> {
        Text::of(value.as_ref()).serialize(s)
    }

    pub fn deserialize<'de, T: From<OsString>, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        Text::deserialize(d)?.os_string().map(T::from)
    }

    /// The same for a list (a command line).
    pub mod list {
        use super::*;

        pub fn serialize<S: Serializer>(values: &[OsString], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(values.iter().map(|v| Text::of(v)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<OsString>, D::Error> {
            Vec::<Text>::deserialize(d)?
                .into_iter()
                .map(Text::os_string)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn os_text_keeps_bytes_that_are_not_utf8() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Record {
            #[serde(with = "os_text")]
            cwd: std::path::PathBuf,
            #[serde(with = "os_text::list")]
            args: Vec<OsString>,
        }
        let odd = OsString::from_vec(b"runs/\xff\xfe".to_vec());
        let record = Record {
            cwd: "/tmp".into(),
            args: vec!["convkit".into(), "--out".into(), odd],
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(
            json.contains(r#""/tmp""#)
                && json.contains(r#"{"unix_bytes":[114,117,110,115,47,255,254]}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), record);
        // Records written as plain strings still read.
        let old = r#"{"cwd":"/w","args":["convkit","train"]}"#;
        assert_eq!(
            serde_json::from_str::<Record>(old).unwrap().args[1],
            "train"
        );
    }

    #[cfg(unix)]
    #[test]
    fn outputs_get_the_umasks_mode_as_any_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("metrics.json");
        write_bytes_atomic(&ours, b"{}").unwrap();
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ours), mode(&plain));
    }

    /// Special files are refused at once, by name: nothing blocks on a FIFO, reads /dev/zero
    /// forever or loops on links.
    #[cfg(unix)]
    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("images.idx");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        for special in [fifo.as_path(), Path::new("/dev/zero")] {
            let err = read_capped(special, u64::MAX).unwrap_err().to_string();
            assert!(
                err.contains("expected a regular file, found a FIFO, socket or device"),
                "{err}"
            );
            assert!(open_regular(special).is_err());
        }
        let err = read_capped(dir.path(), 10).unwrap_err().to_string();
        assert!(err.contains("found a folder"), "{err}");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let err = read_capped(&a, 10).unwrap_err().to_string();
        assert!(err.contains(&a.display().to_string()), "{err}");
        let text = dir.path().join("t.json");
        std::fs::write(&text, "0123456789").unwrap();
        assert_eq!(read_to_string_capped(&text, 10).unwrap(), "0123456789");
        let err = read_to_string_capped(&text, 9).unwrap_err().to_string();
        assert!(
            err.contains("expected at most 9 bytes, the file has 10"),
            "{err}"
        );
    }

    #[test]
    fn a_folder_has_one_owner_and_stale_temporaries_go() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let held = FolderLock::acquire(&run).unwrap();
        let err = FolderLock::acquire(&run).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "process {} is running in this folder",
                std::process::id()
            )) && err.contains("give another --out"),
            "{err}"
        );
        drop(held);
        // The lock is the open file's (flock): a process another test thread is starting
        // holds a copy of every descriptor between its fork and its exec, and with it the
        // lock, for that moment. So the released lock is taken again within a few seconds.
        let again = (0..500).find_map(|_| {
            FolderLock::acquire(&run)
                .inspect_err(|_| std::thread::sleep(std::time::Duration::from_millis(10)))
                .ok()
        });
        assert!(again.is_some(), "the lock was not released");
        // Parts that share a folder lock their own files.
        let _part_1 = FolderLock::acquire_for(&run, "trials-shard-1-of-2.jsonl").unwrap();
        let _part_2 = FolderLock::acquire_for(&run, "trials-shard-2-of-2.jsonl").unwrap();
        let err = FolderLock::acquire_for(&run, "trials-shard-2-of-2.jsonl")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds .convkit-lock-trials-shard-2-of-2.jsonl"),
            "{err}"
        );
        std::fs::write(run.join(".convkit-abc123.tmp"), b"half").unwrap();
        std::fs::write(run.join("model.safetensors"), b"whole").unwrap();
        assert_eq!(remove_stale_temporaries(&run).unwrap(), 1);
        assert!(
            run.join("model.safetensors").exists() && !run.join(".convkit-abc123.tmp").exists()
        );
    }

    #[test]
    fn a_failed_write_leaves_the_previous_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_bytes_atomic(&path, b"previous").unwrap();
        // The disk fills up halfway through the new version.
        let err = write_atomic(&path, |w| {
            w.write_all(b"half of the new")?;
            Err(std::io::Error::from_raw_os_error(28))
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("os error 28"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"previous");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["model.safetensors"]);
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; 100]).unwrap();
        let err = read_to_string_capped(&big, 10).unwrap_err().to_string();
        assert!(err.contains("at most 10 bytes, the file has 100"), "{err}");
    }
}
