//! Counts the lines of files that match a regular expression and prints the counts as JSON:
//! a small program whose dependencies (clap, regex, serde) are what bench/build caches.
use clap::Parser;
use regex::Regex;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Parser)]
#[command(about = "Count matching lines per file, as JSON")]
struct Args {
    /// The regular expression
    pattern: String,
    /// Files to read
    files: Vec<std::path::PathBuf>,
}

#[derive(Serialize)]
struct Report {
    pattern: String,
    matches: BTreeMap<String, usize>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let re = Regex::new(&args.pattern)?;
    let mut matches = BTreeMap::new();
    for f in &args.files {
        let text = std::fs::read_to_string(f)?;
        matches.insert(f.display().to_string(), text.lines().filter(|l| re.is_match(l)).count());
    }
    println!("{}", serde_json::to_string_pretty(&Report { pattern: args.pattern, matches })?);
    Ok(())
}
