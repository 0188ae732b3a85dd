//! `host`, the container executable: `host app run|exec|ps|stop|…` and the
//! monitors of detached containers, with no libostree in the process. Every
//! other command (and any argument this one cannot parse, help included)
//! is handed to `host-full` (see exe.rs), which serves them all.

mod containers;
mod exe;

use std::ffi::OsString;
use std::process::ExitCode;

use cairn_runtime::container::PendingUserns;
use clap::Parser;

use containers::{ContainerCli, ContainerSub, ContainerTop, USERNS_HOST};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if let Some((globals, name)) = containers::monitor_invocation(&args) {
        if std::env::var_os("RUST_LOG").is_some() {
            exe::init_logging(0);
        }
        return containers::supervise(&globals, &name).unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        });
    }
    // `host [-v…] app …`: only then is it worth parsing here.
    let first_command = args
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'));
    if first_command.is_some_and(|c| c == "app") {
        // A plain `app run` is read without clap (see containers/quick.rs).
        let quick = containers::quick_run(&args);
        let begun = begin_namespaces(match &quick {
            Some(q) => q.foreground_with_own_ids(),
            None => foreground_run_with_own_ids(&args),
        });
        let parsed = match quick {
            Some(q) => Some((q.verbose, q.globals, ContainerSub::Run(Box::new(q.run)))),
            None => ContainerCli::try_parse_from(&args).ok().map(|cli| {
                let ContainerTop::App { globals, command } = cli.command;
                (cli.verbose, globals, command)
            }),
        };
        if let Some((verbose, globals, command)) = parsed {
            // The container path logs nothing at the default level (warn):
            // without -v or RUST_LOG, no subscriber (its set-up was 4 % of
            // the distinct instructions of a `run`, see containers/quick.rs
            // for why those count). A monitor does the same.
            if verbose > 0 || std::env::var_os("RUST_LOG").is_some() {
                exe::init_logging(verbose);
            }
            let result = containers::runtime(&globals)
                .and_then(|rt| containers::run(&rt, command, None, begun));
            match result {
                Ok(code) => return code,
                // The image store checks it out: that needs libostree.
                Err(e) if e.downcast_ref::<cairn_runtime::NotCheckedOut>().is_some() => {}
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    exe::exec_full(&args)
}

/// A container's namespaces begun before the command line is parsed, when
/// it reads as a foreground `app run` with a user namespace: making them
/// (0.45 ms, mostly the network namespace) then overlaps the parsing and
/// the image lookup. A line clap must parse is told by a cheap look at its
/// words: a wrong guess costs that kernel work on another CPU, and `run`
/// drops what it does not use.
fn begin_namespaces(foreground_with_own_ids: bool) -> Option<PendingUserns> {
    foreground_with_own_ids
        .then(PendingUserns::spawn)
        .and_then(Result::ok)
}

/// Whether `args` look like `host [FLAGS] app run …` without `-d` or
/// `--userns host` (nor a request for help).
fn foreground_run_with_own_ids(args: &[OsString]) -> bool {
    let words: Vec<&str> = args
        .iter()
        .skip(1)
        .map(|a| a.to_str().unwrap_or(""))
        .collect();
    // The first two words that are not flags: `app`, then `run`.
    let mut plain = words
        .iter()
        .enumerate()
        .filter(|(_, w)| !w.starts_with('-'));
    let (Some((_, first)), Some((at, second))) = (plain.next(), plain.next()) else {
        return false;
    };
    if (*first, *second) != ("app", "run") {
        return false;
    }
    let rest = &words[at + 1..];
    !rest.iter().enumerate().any(|(i, w)| {
        let short_detach = w.starts_with('-') && !w.starts_with("--") && w.contains('d');
        short_detach
            || matches!(*w, "--detach" | "--help" | "-h")
            || w.strip_prefix("--userns=") == Some(USERNS_HOST)
            || (*w == "--userns" && rest.get(i + 1) == Some(&USERNS_HOST))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_foreground_run_is_told_from_its_words() {
        let yes = |line: &str| {
            let args: Vec<std::ffi::OsString> = line.split(' ').map(Into::into).collect();
            super::foreground_run_with_own_ids(&args)
        };
        assert!(yes("host app run --rm busybox true"));
        assert!(yes("host -v app run -it --network none busybox sh"));
        assert!(yes("host app run --userns auto busybox"));
        assert!(!yes("host app run -d busybox sleep 9"));
        assert!(!yes("host app run -dit busybox sh"));
        assert!(!yes("host app run --detach busybox"));
        assert!(!yes("host app run --userns host busybox"));
        assert!(!yes("host app run --userns=host busybox"));
        assert!(!yes("host app run --help"));
        assert!(!yes("host app ps"));
        assert!(!yes("host app"));
        assert!(!yes("host status"));
        // A global's value where the subcommand would be: no guess.
        assert!(!yes("host app --root /srv/cairn run busybox"));
    }
}
