//! The README's configuration table lists every flag with its environment variable, so the
//! documentation cannot drift from `--help`.
use clap::CommandFactory;
use concierge_server::Config;

#[test]
fn every_flag_and_env_var_is_in_the_readme_table() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let cmd = Config::command();
    let mut n = 0;
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let env = arg.get_env().unwrap_or_else(|| panic!("--{long} has no environment variable"));
        let row = format!("| `--{long}` | `{}` |", env.to_string_lossy());
        assert!(readme.contains(&row), "README.md lacks the row {row}");
        n += 1;
    }
    assert!(n >= 16, "only {n} flags found");
    for required in ["CONCIERGE_LISTEN", "CONCIERGE_METRICS_LISTEN", "CONCIERGE_MODEL_DIR", "CONCIERGE_DEVICE"] {
        assert!(cmd.get_arguments().any(|a| a.get_env().is_some_and(|e| e == required)), "{required}");
    }
}
