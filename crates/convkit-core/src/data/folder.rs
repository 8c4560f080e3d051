//! Image folders: `DIR/<class>/*.{png,jpg,jpeg}`, class names from the sub-folder names
//! (sorted), every image decoded with `image`, resized to the model's `H×W` and converted to
//! its channel count.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;

use super::{Dataset, ImageShape};
use crate::{Error, Result};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}

/// Decode one image file and bring it to `target` (resize with a triangle filter; grey or RGB).
pub fn load_image(path: &Path, target: ImageShape) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes).map_err(|e| Error::Image {
        path: path.into(),
        message: e.to_string(),
    })?;
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
            "image folder",
            format!("images can be loaded with 1 or 3 channels, the model wants {c}"),
        )),
    }
}

/// Read `dir/<class>/*.{png,jpg,jpeg}`. With `classes`, those names fix the label order (a
/// test split must use its train split's classes) and an unknown folder is an error.
pub fn read_image_folder(
    dir: &Path,
    target: ImageShape,
    classes: Option<&[String]>,
) -> Result<Dataset> {
    let class_dirs: Vec<PathBuf> = sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    if class_dirs.is_empty() {
        return Err(Error::data(
            dir,
            "no class folders: expected DIR/<class>/*.png|jpg",
        ));
    }
    let names: Vec<String> = class_dirs
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let classes: Vec<String> = match classes {
        Some(known) => {
            if let Some(extra) = names.iter().find(|n| !known.contains(n)) {
                return Err(Error::data(
                    dir,
                    format!("class folder `{extra}` is not one of the known classes {known:?}"),
                ));
            }
            known.to_vec()
        }
        None => names.clone(),
    };
    let mut files = Vec::new();
    for (class_dir, name) in class_dirs.iter().zip(&names) {
        let label = classes
            .iter()
            .position(|c| c == name)
            .expect("checked above") as u32;
        for path in sorted_entries(class_dir)? {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            if ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
                files.push((path, label));
            }
        }
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
    Dataset::new(decoded.concat(), target, labels, classes)
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
        std::fs::write(dir.path().join("dog").join("notes.txt"), "ignored").unwrap();
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
