//! One source for figures: every measured figure the README quotes (seconds, minutes, ratios,
//! percentages, four-decimal accuracies) must be in docs/measurements.md, where each comes with
//! its date, machine and command. A test fails on a figure that is not.

/// The README's quoted figures, with the unit that marks them as measured: `19.9 s`,
/// `1.29×`, `24.3%`, `43 min`, or an accuracy such as `0.9870`. Code blocks are skipped
/// (their numbers are arguments, not measurements).
fn quoted_figures(readme: &str) -> Vec<String> {
    let mut figures = Vec::new();
    let mut in_code = false;
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let starts = chars[i].is_ascii_digit()
                && (i == 0 || !(chars[i - 1].is_alphanumeric() || ".,_-".contains(chars[i - 1])));
            if !starts {
                i += 1;
                continue;
            }
            let begin = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let number: String = chars[begin..i].iter().collect();
            let number = number.trim_end_matches('.').to_string();
            let rest: String = chars[i..].iter().take(4).collect();
            let unit = ["×", "%", " s ", " s)", " s,", " s;", " s.", " min"]
                .iter()
                .any(|u| rest.starts_with(u) || format!("{rest} ").starts_with(u));
            let accuracy = number.starts_with("0.") && number.len() == 6;
            if number.contains('.') && (unit || accuracy) {
                figures.push(number);
            }
        }
    }
    figures
}

/// Every number written in `text`, as it is written (thousands separators dropped).
fn numbers(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() || (c == '.' && !current.is_empty()) {
            current.push(c);
        } else if c == ',' && !current.is_empty() {
            // 2,475: a thousands separator, kept out.
        } else if !current.is_empty() {
            found.push(current.trim_end_matches('.').to_string());
            current.clear();
        }
    }
    found
}

/// Whether `measured` is `figure` or rounds to it (the README may quote 18.29 as 18.3).
fn rounds_to(measured: &str, figure: &str) -> bool {
    if measured == figure {
        return true;
    }
    let decimals = figure.split_once('.').map_or(0, |(_, d)| d.len());
    let more = measured.split_once('.').map_or(0, |(_, d)| d.len());
    match (measured.parse::<f64>(), figure.parse::<f64>()) {
        (Ok(m), Ok(_)) if more > decimals => format!("{m:.decimals$}") == figure,
        _ => false,
    }
}

/// The README's figures that no number in the measurements gives.
pub fn unmatched(readme: &str, measurements: &str) -> Vec<String> {
    let measured = numbers(measurements);
    let mut missing: Vec<String> = quoted_figures(readme)
        .into_iter()
        .filter(|f| !measured.iter().any(|m| rounds_to(m, f)))
        .collect();
    missing.dedup();
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_found_with_their_units() {
        let readme = "takes 19.9 s (0.9870), 1.29× PyTorch, 24.3% of peak, 43 min cold\n\
                      ```sh\nconvkit train --learning-rate 0.001 --epochs 1.5\n```\n\
                      rate 0.001, version 2.9.0";
        assert_eq!(
            quoted_figures(readme),
            ["19.9", "0.9870", "1.29", "24.3"].map(String::from)
        );
        assert!(rounds_to("18.29", "18.3") && rounds_to("0.9870", "0.9870"));
        assert!(!rounds_to("18.24", "18.3") && !rounds_to("18.3", "18.29"));
        let measured = "| candle | 19.94 (1.288×) | 2,475 | 0.9870 | 24.31% |";
        assert_eq!(unmatched(readme, measured), Vec::<String>::new());
        assert_eq!(unmatched(readme, "19.9 1.29 24.3"), ["0.9870"]);
    }

    /// The check itself: the README quotes only what docs/measurements.md records.
    #[test]
    fn every_figure_in_the_readme_is_in_the_measurements() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
        let missing = unmatched(&read("README.md"), &read("docs/measurements.md"));
        assert!(
            missing.is_empty(),
            "README.md quotes figures that docs/measurements.md does not record (with date, machine and command): {missing:?}"
        );
    }
}
