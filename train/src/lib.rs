//! Training and evaluation behind `concierge train-… / eval-…`: data in, a checkpoint folder
//! out that the server loads as it is. CPU or any candle device; seeded (parameter init, data
//! order and dropout masks come from our own RNG, so a seed gives the same run).
pub mod char_bert;
pub mod intent;
pub mod lac;
mod layers;
pub mod rng;
pub mod tagger;
pub mod vectors;

/// A progress bar on stderr that says what it counts.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    bar.set_prefix(what.to_string());
    bar
}
