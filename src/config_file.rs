//! `quire serve --config FILE`: a TOML file of settings, one key per flag.
//!
//! One precedence order for every setting: a flag on the command line, then its
//! environment variable (`QUIRE_` and the flag's name in capitals, shown by `--help`),
//! then the file, then the default `--help` shows. The file's settings are turned into
//! flags placed after the command line's, and only for the settings that neither the
//! command line nor the environment gives: clap then parses, checks and reports them as
//! it does its own (an unknown key is an unknown flag, named in the error).

use std::ffi::OsString;
use std::path::PathBuf;

/// `args` (the whole command line), with the settings of `serve`'s config file (from
/// `--config` or `QUIRE_CONFIG`) added as flags where nothing above the file sets them.
/// Other commands, and `serve` without a file, are returned as they are.
pub fn with_file_settings(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    with_file_settings_from(args, |name| std::env::var_os(name))
}

fn with_file_settings_from(
    mut args: Vec<OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Vec<OsString>, String> {
    let Some(serve) = args.iter().position(|a| a == "serve") else {
        return Ok(args);
    };
    let Some(path) =
        config_path(&args[serve + 1..]).or_else(|| env("QUIRE_CONFIG").map(PathBuf::from))
    else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("the config file {} is not valid TOML: {e}", path.display()))?;
    let mut added = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let env_name = format!("QUIRE_{}", key.replace('-', "_").to_uppercase());
        if flag == "--config" {
            return Err(format!(
                "{}: `config` cannot be set from a config file",
                path.display()
            ));
        }
        let given = args[1..].iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
        });
        if given || env(&env_name).is_some() {
            continue;
        }
        let values = match value {
            toml::Value::Array(items) => items,
            one => vec![one],
        };
        for value in values {
            match value {
                toml::Value::Boolean(true) => added.push(flag.clone()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => added.extend([flag.clone(), s]),
                toml::Value::Integer(i) => added.extend([flag.clone(), i.to_string()]),
                toml::Value::Float(f) => added.extend([flag.clone(), f.to_string()]),
                other => {
                    return Err(format!(
                        "{}: `{key}` is a {}; a setting is a string, number or boolean",
                        path.display(),
                        other.type_str()
                    ))
                }
            }
        }
    }
    args.extend(added.into_iter().map(OsString::from));
    Ok(args)
}

/// The value of `--config PATH` or `--config=PATH` among `args`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_str()?;
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(path) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cmdline: &[&str], file: &str, env: &[(&str, &str)]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quire.toml");
        std::fs::write(&path, file).unwrap();
        let mut args: Vec<OsString> = cmdline.iter().map(OsString::from).collect();
        args.extend([OsString::from("--config"), path.clone().into()]);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        };
        let out = with_file_settings_from(args, lookup)?;
        // Only what was added after the command line.
        Ok(out
            .into_iter()
            .skip(cmdline.len() + 2)
            .map(|a| a.into_string().unwrap())
            .collect())
    }

    #[test]
    fn file_settings_become_flags_below_the_command_line_and_the_environment() {
        let file = "max_frame = 65536\nlisten = \"127.0.0.1:9000\"\nsegment-mib = 8\n\
                    insecure = true\nrepair_wal = false\n";
        let added = run(
            &["quire", "serve", "--listen", "127.0.0.1:1"],
            file,
            &[("QUIRE_SEGMENT_MIB", "16")],
        )
        .unwrap();
        // listen: the command line's; segment_mib: the environment's; repair_wal false.
        assert_eq!(added, ["--insecure", "--max-frame", "65536"]);
    }

    #[test]
    fn an_array_repeats_its_flag_and_a_table_is_refused() {
        let added = run(&["quire", "serve"], "secret = [\"a\", \"b\"]\n", &[]).unwrap();
        assert_eq!(added, ["--secret", "a", "--secret", "b"]);
        let e = run(&["quire", "serve"], "[limits]\nx = 1\n", &[]).unwrap_err();
        assert!(e.contains("`limits` is a table"), "{e}");
    }

    #[test]
    fn bad_toml_and_a_missing_file_are_errors_that_name_the_file() {
        let e = run(&["quire", "serve"], "max_frame = \n", &[]).unwrap_err();
        assert!(
            e.contains("quire.toml") && e.contains("not valid TOML"),
            "{e}"
        );
        let args = ["quire", "serve", "--config", "/nonexistent/quire.toml"]
            .map(OsString::from)
            .to_vec();
        let e = with_file_settings_from(args, |_| None).unwrap_err();
        assert!(e.contains("/nonexistent/quire.toml"), "{e}");
    }

    #[test]
    fn other_commands_and_serve_without_a_file_are_untouched() {
        let args: Vec<OsString> = ["quire", "token", "--doc", "x"]
            .map(OsString::from)
            .to_vec();
        assert_eq!(
            with_file_settings_from(args.clone(), |_| None).unwrap(),
            args
        );
        let args: Vec<OsString> = ["quire", "serve"].map(OsString::from).to_vec();
        assert_eq!(
            with_file_settings_from(args.clone(), |_| None).unwrap(),
            args
        );
    }
}
