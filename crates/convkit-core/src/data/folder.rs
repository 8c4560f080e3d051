//! Image folders: `DIR/<class>/**/*.{png,jpg,jpeg}` (images in nested folders belong to their
//! top-level class folder, as in Keras' `image_dataset_from_directory`), class names from the
//! sub-folder names (sorted), every image decoded with `image` under [`decode_limits`], resized
//! to the model's `H×W` and converted to its channel count (grey, RGB, RGBA, palette and 16-bit
//! images all load).

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;

use super::{Dataset, ImageShape};
use crate::{Error, Result};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Most entries convkit lists in one folder: far more than a class folder holds, few enough
/// that the listing's memory stays bounded.
pub const MAX_FOLDER_ENTRIES: usize = 1 << 20;

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .take(MAX_FOLDER_ENTRIES + 1)
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<Vec<_>>>()?;
    if entries.len() > MAX_FOLDER_ENTRIES {
        return Err(Error::data(
            dir,
            format!("holds more than {MAX_FOLDER_ENTRIES} entries, the most convkit lists in one folder; split it into sub-folders"),
        ));
    }
    entries.sort();
    Ok(entries)
}

/// Largest image side decoded, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Most memory one image's decoder may allocate, in bytes.
pub const MAX_IMAGE_ALLOC: u64 = 256 << 20;

/// The limits every image is decoded under: a crafted header cannot make the decoder allocate
/// more than [`MAX_IMAGE_ALLOC`] bytes or accept a side over [`MAX_IMAGE_SIDE`] pixels.
pub fn decode_limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    limits
}

/// Decode one image file and bring it to `target` (resize with a triangle filter; grey or RGB).
pub fn load_image(path: &Path, target: ImageShape) -> Result<Vec<u8>> {
    let bytes = crate::io::read_capped(path, MAX_IMAGE_ALLOC)?;
    let image_error = |e: image::ImageError| Error::Image {
        path: path.into(),
        message: e.to_string(),
    };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.limits(decode_limits());
    fitted(reader.decode().map_err(image_error)?, target)
}

/// `img` brought to `target`: resized with a triangle (bilinear) filter when its size
/// differs, then made grey (1 channel, `image`'s luma weights) or RGB (3, grey replicated).
fn fitted(img: image::DynamicImage, target: ImageShape) -> Result<Vec<u8>> {
    let (w, h) = (target.width as u32, target.height as u32);
    let img = if img.width() == w && img.height() == h {
        img
    } else {
        img.resize_exact(w, h, FilterType::Triangle)
    };
    match target.channels {
        1 => Ok(img.into_luma8().into_raw()),
        3 => Ok(img.into_rgb8().into_raw()),
        c => Err(Error::config(
            "images",
            format!("images can be brought to 1 or 3 channels, the model wants {c}"),
        )),
    }
}

/// The image files under `dir` and its sub-folders, sorted by path, and the other files
/// (`left_out`). Symbolic links to folders are not followed, so a link cycle cannot make the
/// walk endless.
fn image_files(dir: &Path, found: &mut Vec<PathBuf>, left_out: &mut Vec<PathBuf>) -> Result<()> {
    for path in sorted_entries(dir)? {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            image_files(&path, found, left_out)?;
        } else {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            if ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
                found.push(path);
            } else {
                left_out.push(path);
            }
        }
    }
    Ok(())
}

/// The class folders of `dir` (sorted) and their names. Names must be distinct after UTF-8
/// conversion: two folders whose names differ only in invalid bytes would be one class.
pub(crate) fn class_folders(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut folders: Vec<(PathBuf, String)> = Vec::new();
    for path in sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()) {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if let Some((other, _)) = folders.iter().find(|(_, n)| *n == name) {
            return Err(Error::data(
                dir,
                format!(
                    "class folders {} and {} have the same name `{name}` once read as UTF-8; rename one",
                    other.display(),
                    path.display()
                ),
            ));
        }
        folders.push((path, name));
    }
    if folders.is_empty() {
        return Err(Error::data(
            dir,
            "no class folders: expected DIR/<class>/*.png|jpg",
        ));
    }
    Ok(folders)
}

/// Read `dir/<class>/**/*.{png,jpg,jpeg}`. With `classes`, those names fix the label order (a
/// test split must use its train split's classes) and an unknown folder is an error.
pub fn read_image_folder(
    dir: &Path,
    target: ImageShape,
    classes: Option<&[String]>,
) -> Result<Dataset> {
    read_image_folder_noting(dir, target, classes).map(|(data, _)| data)
}

/// [`read_image_folder`], and a note naming the files it left out (not PNG or JPEG, or not in
/// a class folder), if any: nothing is skipped silently.
pub(crate) fn read_image_folder_noting(
    dir: &Path,
    target: ImageShape,
    classes: Option<&[String]>,
) -> Result<(Dataset, Option<String>)> {
    let mut left_out: Vec<PathBuf> = (sorted_entries(dir)?.into_iter())
        .filter(|p| !p.is_dir())
        .collect();
    let folders = class_folders(dir)?;
    let classes: Vec<String> = match classes {
        Some(known) => {
            if let Some((_, extra)) = folders.iter().find(|(_, n)| !known.contains(n)) {
                return Err(Error::data(
                    dir,
                    format!("class folder `{extra}` is not one of the known classes {known:?}"),
                ));
            }
            known.to_vec()
        }
        None => folders.iter().map(|(_, n)| n.clone()).collect(),
    };
    let mut files = Vec::new();
    for (class_dir, name) in &folders {
        let label = classes
            .iter()
            .position(|c| c == name)
            .expect("checked above") as u32;
        let mut found = Vec::new();
        image_files(class_dir, &mut found, &mut left_out)?;
        files.extend(found.into_iter().map(|path| (path, label)));
    }
    if files.is_empty() {
        return Err(Error::data(
            dir,
            "no images (.png, .jpg, .jpeg) in any class folder",
        ));
    }
    let decoded: Vec<Vec<u8>> = files
        .par_iter()
        .map(|(path, _)| load_image(path, target))
        .collect::<Result<_>>()?;
    let labels = files.iter().map(|(_, l)| *l).collect();
    let note = left_out.first().map(|first| {
        let n = left_out.len();
        let (files, are) = if n == 1 {
            ("file", "is")
        } else {
            ("files", "are")
        };
        format!(
            "{n} {files} that {are} not a PNG or JPEG image in a class folder left out, such as {}",
            first.strip_prefix(dir).unwrap_or(first).display()
        )
    });
    Ok((
        Dataset::new(decoded.concat(), target, labels, classes)?,
        note,
    ))
}

impl Dataset {
    /// Write the images as PNG files into an image folder, `dir/<class>/<index>.png`, the
    /// layout [`read_image_folder`] reads. A class name becomes a folder name with `/` and `\`
    /// replaced by `_` (Fashion-MNIST's `T-shirt/top`); a name that cannot be a folder (empty,
    /// `.`, `..`) is an error. Each file is written atomically.
    pub fn write_image_folder(&self, dir: &Path) -> Result<()> {
        let folders: Vec<String> = self
            .classes
            .iter()
            .map(|c| match c.replace(['/', '\\'], "_") {
                name if name.is_empty() || name == "." || name == ".." => Err(Error::data(
                    dir,
                    format!("class name `{c}` cannot be a folder name"),
                )),
                name => Ok(name),
            })
            .collect::<Result<_>>()?;
        let (w, h) = (self.shape.width as u32, self.shape.height as u32);
        let color = match self.shape.channels {
            1 => image::ExtendedColorType::L8,
            3 => image::ExtendedColorType::Rgb8,
            c => {
                return Err(Error::config(
                    "image folder",
                    format!("PNG files hold 1 or 3 channels here, the dataset has {c}"),
                ))
            }
        };
        for i in 0..self.len() {
            let path = dir
                .join(&folders[self.labels[i] as usize])
                .join(format!("{i:06}.png"));
            let mut png = Vec::new();
            image::ImageEncoder::write_image(
                image::codecs::png::PngEncoder::new(&mut png),
                self.image(i),
                w,
                h,
                color,
            )
            .map_err(|e| Error::Image {
                path: path.clone(),
                message: e.to_string(),
            })?;
            crate::io::write_bytes_atomic(&path, &png)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_resizes_and_converts() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("dog", 2), ("cat", 1)] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_pixel(40 + i, 30, image::Rgb([200, 100, 50]));
                img.save(dir.path().join(class).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        std::fs::write(dir.path().join("dog").join("notes.txt"), "left out").unwrap();
        std::fs::write(dir.path().join("README"), "left out").unwrap();
        // What is left out is named, never skipped silently.
        let (_, note) =
            read_image_folder_noting(dir.path(), ImageShape::new(8, 8, 3), None).unwrap();
        let note = note.unwrap();
        assert!(
            note.starts_with("2 files that are not a PNG or JPEG image in a class folder left out, such as README"),
            "{note}"
        );
        let ds = read_image_folder(dir.path(), ImageShape::new(8, 8, 3), None).unwrap();
        assert_eq!(ds.classes, vec!["cat", "dog"]);
        assert_eq!(ds.labels, vec![0, 1, 1]);
        assert_eq!(&ds.image(2)[..3], &[200, 100, 50]);
        let grey = read_image_folder(dir.path(), ImageShape::new(4, 5, 1), None).unwrap();
        assert_eq!(grey.shape, ImageShape::new(4, 5, 1));
        let known = vec!["cat".to_string(), "dog".into(), "emu".into()];
        assert_eq!(
            read_image_folder(dir.path(), ImageShape::new(4, 4, 1), Some(&known))
                .unwrap()
                .classes
                .len(),
            3
        );
        let err =
            read_image_folder(dir.path(), ImageShape::new(4, 4, 1), Some(&known[..1])).unwrap_err();
        assert!(
            err.to_string().contains("class folder `dog` is not one of"),
            "{err}"
        );
    }

    #[test]
    fn nested_folders_and_every_colour_mode() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("bird").join("2024").join("june");
        std::fs::create_dir_all(&nested).unwrap();
        image::RgbaImage::from_pixel(9, 7, image::Rgba([10, 20, 30, 0]))
            .save(nested.join("a.png"))
            .unwrap();
        image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(5, 5, image::Luma([65535u16]))
            .save(dir.path().join("bird").join("b.png"))
            .unwrap();
        image::GrayImage::from_pixel(3, 3, image::Luma([7]))
            .save(dir.path().join("bird").join("c.jpg"))
            .unwrap();
        let ds = read_image_folder(dir.path(), ImageShape::new(4, 4, 3), None).unwrap();
        assert_eq!(
            (ds.len(), ds.classes.clone()),
            (3, vec!["bird".to_string()])
        );
        // Sorted by path: 2024/june/a.png, b.png, c.jpg.
        assert_eq!(&ds.image(0)[..3], &[10, 20, 30]);
        assert_eq!(&ds.image(1)[..3], &[255, 255, 255]);
    }

    #[test]
    fn a_dataset_written_as_a_folder_reads_back_the_same() {
        let mut ds = crate::data::synthetic(6, ImageShape::new(5, 4, 3), 3, 1).unwrap();
        ds.classes = vec!["a/b".into(), "c".into(), "d".into()];
        let dir = tempfile::tempdir().unwrap();
        ds.write_image_folder(dir.path()).unwrap();
        assert!(dir.path().join("a_b").is_dir());
        let back = read_image_folder(dir.path(), ds.shape, None).unwrap();
        assert_eq!(back.len(), 6);
        // Read back class by class: compare each image with its original.
        for i in 0..back.len() {
            let name = &back.classes[back.labels[i] as usize];
            let original = (0..ds.len())
                .filter(|&j| ds.classes[ds.labels[j] as usize].replace('/', "_") == *name)
                .any(|j| ds.image(j) == back.image(i));
            assert!(original, "image {i} of class {name}");
        }
        ds.classes[0] = "..".into();
        let err = ds.write_image_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cannot be a folder name"), "{err}");
    }

    #[test]
    fn colliding_class_names_are_an_error() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        for raw in [&b"caf\xff"[..], &b"caf\xfe"[..]] {
            let class = dir.path().join(std::ffi::OsStr::from_bytes(raw));
            std::fs::create_dir(&class).unwrap();
            image::GrayImage::new(2, 2)
                .save(class.join("x.png"))
                .unwrap();
        }
        let err = read_image_folder(dir.path(), ImageShape::new(2, 2, 1), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the same name `caf\u{fffd}`"), "{err}");
    }

    #[test]
    fn huge_declared_images_are_refused_before_decoding() {
        // A valid PNG header declaring 20,000 × 20,000 RGBA pixels (1.6 GB), and no data.
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(20_000u32.to_be_bytes());
        ihdr.extend(20_000u32.to_be_bytes());
        ihdr.extend([8, 6, 0, 0, 0]);
        let mut crc = flate2::Crc::new();
        crc.update(&ihdr);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(13u32.to_be_bytes());
        png.extend(&ihdr);
        png.extend(crc.sum().to_be_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        std::fs::write(&path, png).unwrap();
        let err = load_image(&path, ImageShape::new(4, 4, 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("huge.png") && err.contains("limit"), "{err}");
    }

    #[test]
    fn empty_and_broken_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_image_folder(dir.path(), ImageShape::new(4, 4, 1), None).unwrap_err();
        assert!(err.to_string().contains("no class folders"), "{err}");
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let err = read_image_folder(dir.path(), ImageShape::new(4, 4, 1), None).unwrap_err();
        assert!(err.to_string().contains("no images"), "{err}");
        std::fs::write(
            dir.path().join("a").join("broken.jpg"),
            b"\xff\xd8\xff\xe0 not really a jpeg",
        )
        .unwrap();
        let err = read_image_folder(dir.path(), ImageShape::new(4, 4, 1), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.jpg") && err.contains("cannot decode image"),
            "{err}"
        );
        let err = read_image_folder(&dir.path().join("nope"), ImageShape::new(4, 4, 1), None)
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
