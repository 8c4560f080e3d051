//! Data augmentation, as Keras' preprocessing layers: random horizontal/vertical flips,
//! rotation, translation and zoom, applied per batch on the fly (never stored), seeded by
//! core, so every engine still sees the same batches.
//!
//! Each image is resampled by inverse mapping with bilinear interpolation; points that fall
//! outside are reflected back in (Keras' default `fill_mode="reflect"`).

use ndarray::ArrayViewMut4;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// What to randomise, with Keras-like parameters.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Augment {
    pub horizontal_flip: bool,
    pub vertical_flip: bool,
    /// Maximum rotation, in degrees either way.
    pub rotation_degrees: f32,
    /// Maximum translation, as a fraction of height/width either way.
    pub shift: f32,
    /// Maximum zoom, as a fraction either way (0.1: scale in 0.9..1.1).
    pub zoom: f32,
}

impl Augment {
    /// Parse `flip,vflip,rotate=10,shift=0.1,zoom=0.1` (any subset, any order).
    pub fn parse(text: &str) -> Result<Self> {
        let mut a = Augment::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let number = |max: f32| -> Result<f32> {
                let v: f32 = value.parse().map_err(|_| {
                    Error::config(
                        "augmentation",
                        format!("`{key}` needs a number, found `{value}`"),
                    )
                })?;
                if (0.0..=max).contains(&v) {
                    Ok(v)
                } else {
                    Err(Error::config(
                        "augmentation",
                        format!("`{key}` must be in [0, {max}], found {v}"),
                    ))
                }
            };
            match key {
                "flip" | "hflip" => a.horizontal_flip = true,
                "vflip" => a.vertical_flip = true,
                "rotate" | "rotation" => a.rotation_degrees = number(180.0)?,
                "shift" | "translate" => a.shift = number(1.0)?,
                "zoom" => a.zoom = number(0.9)?,
                other => {
                    return Err(Error::config("augmentation", format!("unknown `{other}`: expected flip, vflip, rotate=DEG, shift=FRACTION or zoom=FRACTION")))
                }
            }
        }
        Ok(a)
    }

    pub fn is_identity(&self) -> bool {
        *self == Augment::default()
    }

    /// Augment every image of `batch` (`[n, H, W, C]`) in place; `scratch` is reused between calls.
    pub fn apply(
        &self,
        mut batch: ArrayViewMut4<'_, f32>,
        rng: &mut ChaCha8Rng,
        scratch: &mut Vec<f32>,
    ) {
        if self.is_identity() {
            return;
        }
        let (_, h, w, c) = batch.dim();
        let data = batch
            .as_slice_mut()
            .expect("batch buffers are standard layout");
        for image in data.chunks_exact_mut(h * w * c) {
            let flip_x = self.horizontal_flip && rng.random::<bool>();
            let flip_y = self.vertical_flip && rng.random::<bool>();
            let angle = if self.rotation_degrees > 0.0 {
                rng.random_range(-self.rotation_degrees..=self.rotation_degrees)
                    .to_radians()
            } else {
                0.0
            };
            let (dy, dx) = if self.shift > 0.0 {
                (
                    rng.random_range(-self.shift..=self.shift) * h as f32,
                    rng.random_range(-self.shift..=self.shift) * w as f32,
                )
            } else {
                (0.0, 0.0)
            };
            let scale = if self.zoom > 0.0 {
                rng.random_range(1.0 - self.zoom..=1.0 + self.zoom)
            } else {
                1.0
            };
            scratch.clear();
            scratch.extend_from_slice(image);
            let (cy, cx) = ((h as f32 - 1.0) / 2.0, (w as f32 - 1.0) / 2.0);
            let (sin, cos) = angle.sin_cos();
            for y in 0..h {
                for x in 0..w {
                    // output → source: undo the shift, the rotation and the zoom about the centre
                    let (u, v) = (x as f32 - cx - dx, y as f32 - cy - dy);
                    let mut sx = (cos * u + sin * v) / scale + cx;
                    let mut sy = (-sin * u + cos * v) / scale + cy;
                    if flip_x {
                        sx = w as f32 - 1.0 - sx;
                    }
                    if flip_y {
                        sy = h as f32 - 1.0 - sy;
                    }
                    let out = &mut image[(y * w + x) * c..(y * w + x + 1) * c];
                    bilinear(scratch, h, w, c, reflect(sy, h), reflect(sx, w), out);
                }
            }
        }
    }
}

impl Augment {
    /// A dataset to look at: each of the first `originals` images of `data` followed by
    /// `copies` augmented versions of it, so a [`crate::plot::SampleGrid`] with `1 + copies`
    /// columns shows each original at the start of its row.
    pub fn preview(
        &self,
        data: &crate::Dataset,
        originals: usize,
        copies: usize,
        seed: u64,
    ) -> Result<crate::Dataset> {
        use rand::SeedableRng;
        let originals = originals.min(data.len());
        let s = data.shape;
        let raw = data.clone().normalise(crate::Normalisation::None);
        let repeated: Vec<usize> = (0..originals)
            .flat_map(|i| std::iter::repeat_n(i, copies))
            .collect();
        let mut batch = ndarray::Array4::zeros((repeated.len(), s.height, s.width, s.channels));
        raw.fill_batch(&repeated, batch.view_mut())?;
        self.apply(
            batch.view_mut(),
            &mut ChaCha8Rng::seed_from_u64(seed),
            &mut Vec::new(),
        );
        let augmented: Vec<u8> = batch
            .iter()
            .map(|v| v.round().clamp(0.0, 255.0) as u8)
            .collect();
        let mut pixels = Vec::with_capacity(originals * (1 + copies) * s.len());
        let mut labels = Vec::with_capacity(originals * (1 + copies));
        for i in 0..originals {
            pixels.extend_from_slice(data.image(i));
            pixels.extend_from_slice(&augmented[i * copies * s.len()..(i + 1) * copies * s.len()]);
            labels.extend(std::iter::repeat_n(data.labels[i], 1 + copies));
        }
        crate::Dataset::new(pixels, s, labels, data.classes.clone())
    }
}

/// Reflect a coordinate into `[0, n − 1]` (d c b | a b c d | c b a).
fn reflect(p: f32, n: usize) -> f32 {
    let max = (n - 1) as f32;
    if max == 0.0 {
        return 0.0;
    }
    let period = 2.0 * max;
    let q = p.rem_euclid(period);
    if q > max {
        period - q
    } else {
        q
    }
}

fn bilinear(src: &[f32], h: usize, w: usize, c: usize, y: f32, x: f32, out: &mut [f32]) {
    let (y0, x0) = (y.floor() as usize, x.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
    let (fy, fx) = (y - y0 as f32, x - x0 as f32);
    for (k, o) in out.iter_mut().enumerate() {
        let p = |yy: usize, xx: usize| src[(yy * w + xx) * c + k];
        *o = (p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx) * (1.0 - fy)
            + (p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx) * fy;
    }
}

/// The `size = [h, w]` window at each image's `[top, left]` of `corners`, from a batch
/// `[n, H, W, C]`: what a RandomCrop layer gives (see [`crate::spec::RandomCrop`]).
pub fn crop(
    batch: ndarray::ArrayView4<'_, f32>,
    corners: &[[usize; 2]],
    [h, w]: [usize; 2],
) -> ndarray::Array4<f32> {
    use ndarray::s;
    let (n, _, _, c) = batch.dim();
    let mut out = ndarray::Array4::zeros((n, h, w, c));
    for (i, &[top, left]) in corners.iter().enumerate().take(n) {
        out.slice_mut(s![i, .., .., ..]).assign(&batch.slice(s![
            i,
            top..top + h,
            left..left + w,
            ..
        ]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;
    use rand::SeedableRng;

    fn ramp() -> Array4<f32> {
        Array4::from_shape_fn((4, 5, 6, 2), |(n, y, x, c)| {
            (n * 100 + y * 10 + x) as f32 + c as f32 * 0.5
        })
    }

    #[test]
    fn parse_and_errors() {
        let a = Augment::parse("flip,rotate=10,shift=0.1,zoom=0.2").unwrap();
        assert!(a.horizontal_flip && !a.vertical_flip);
        assert_eq!((a.rotation_degrees, a.shift, a.zoom), (10.0, 0.1, 0.2));
        assert!(Augment::parse("").unwrap().is_identity());
        assert!(Augment::parse("blur")
            .unwrap_err()
            .to_string()
            .contains("unknown `blur`"));
        assert!(Augment::parse("rotate=x")
            .unwrap_err()
            .to_string()
            .contains("needs a number"));
        assert!(Augment::parse("zoom=2")
            .unwrap_err()
            .to_string()
            .contains("must be in [0, 0.9]"));
    }

    #[test]
    fn flips_are_exact_and_identity_leaves_images_alone() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut scratch = Vec::new();
        let mut x = ramp();
        Augment::default().apply(x.view_mut(), &mut rng, &mut scratch);
        assert_eq!(x, ramp());
        // zero rotation/shift/zoom through the resampler: identity up to rounding
        let tiny = Augment {
            rotation_degrees: 1e-6,
            ..Default::default()
        };
        tiny.apply(x.view_mut(), &mut rng, &mut scratch);
        assert!(x
            .iter()
            .zip(ramp().iter())
            .all(|(a, b)| (a - b).abs() < 1e-3));
        // a flip either leaves an image or mirrors it exactly
        let mut x = ramp();
        Augment {
            horizontal_flip: true,
            ..Default::default()
        }
        .apply(x.view_mut(), &mut rng, &mut scratch);
        let orig = ramp();
        for n in 0..4 {
            let same = (0..5).all(|y| (0..6).all(|xx| x[[n, y, xx, 0]] == orig[[n, y, xx, 0]]));
            let mirrored =
                (0..5).all(|y| (0..6).all(|xx| x[[n, y, xx, 0]] == orig[[n, y, 5 - xx, 0]]));
            assert!(same || mirrored, "image {n}");
        }
    }

    #[test]
    fn seeded_and_stays_in_range() {
        let a = Augment::parse("flip,vflip,rotate=30,shift=0.2,zoom=0.3").unwrap();
        let run = |seed| {
            let mut x = ramp();
            a.apply(
                x.view_mut(),
                &mut ChaCha8Rng::seed_from_u64(seed),
                &mut Vec::new(),
            );
            x
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        let (lo, hi) = ramp()
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(
            run(3).iter().all(|&v| v >= lo - 1e-3 && v <= hi + 1e-3),
            "bilinear + reflect never leaves the input's range"
        );
        assert_eq!(reflect(-1.0, 5), 1.0);
        assert_eq!(reflect(5.0, 5), 3.0);
    }
}
