//! `host [-v…] app run …` read without clap, when its words take only the
//! plain forms below. Anything else returns `None` and clap parses the
//! line as usual, so help, errors and every unusual spelling stay clap's:
//! a global flag on the line, `--`, `-eVALUE`, a value that starts with
//! `-` or is empty, a flag given twice that takes one value, a value its
//! parser refuses, an empty or non-UTF-8 variable in the environment.
//!
//! Why: a start of `host` runs its code at a new address each time (PIE),
//! and under QEMU's TCG (the boot tests, the guest benchmark) every
//! instruction run for the first time is translated again. clap's command
//! building and parsing were 29 % of the distinct instructions a `run`
//! executes. The values go through the same parsers and defaults as
//! clap's (containers.rs); `the_quick_reading_is_clap_s` checks both
//! readings agree.

use std::ffi::OsString;
use std::path::PathBuf;

use super::*;

/// A command line read as `host [-v…] app run …`.
#[derive(Debug)]
#[allow(dead_code)] // used by the container executable only
pub struct QuickRun {
    pub verbose: u8,
    pub globals: AppGlobals,
    pub run: RunArgs,
}

impl QuickRun {
    /// Whether the run gets its own user namespace in the foreground (see
    /// `begin_namespaces` in main.rs).
    #[allow(dead_code)] // used by the container executable only
    pub fn foreground_with_own_ids(&self) -> bool {
        !self.run.detach && self.run.userns != USERNS_HOST
    }
}

/// `args` (argv, with the program's name) read as a plain `app run`, or
/// `None` for clap to parse.
#[allow(dead_code)] // used by the container executable only
pub fn quick_run(args: &[OsString]) -> Option<QuickRun> {
    let words: Vec<&str> = args
        .iter()
        .skip(1)
        .map(|a| a.to_str())
        .collect::<Option<_>>()?;
    let mut words = words.into_iter();
    let mut verbose: u8 = 0;
    loop {
        match words.next()? {
            "app" => break,
            "--verbose" => verbose = verbose.checked_add(1)?,
            w if w.len() > 1 && w.starts_with('-') && w[1..].bytes().all(|b| b == b'v') => {
                verbose = verbose.checked_add(u8::try_from(w.len() - 1).ok()?)?
            }
            _ => return None,
        }
    }
    if words.next()? != "run" {
        return None;
    }
    let mut f = Flags::default();
    let image = loop {
        let w = words.next()?;
        if let Some(long) = w.strip_prefix("--") {
            let (flag, inline) = match long.split_once('=') {
                Some((flag, value)) => (flag, Some(value)),
                None => (long, None),
            };
            if let Some(set) = f.switch(flag) {
                if inline.is_some() || *set {
                    return None;
                }
                *set = true;
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => words.next()?,
            };
            f.value(flag, value)?;
        } else if let Some(short) = w.strip_prefix('-') {
            match short {
                "e" => f.value("env", words.next()?)?,
                "v" => f.value("volume", words.next()?)?,
                // A cluster of switches: -d, -it, -dit …
                _ if !short.is_empty() => {
                    for c in short.chars() {
                        let set = f.switch(match c {
                            'd' => "detach",
                            'i' => "interactive",
                            't' => "tty",
                            _ => return None,
                        })?;
                        if *set {
                            return None;
                        }
                        *set = true;
                    }
                }
                _ => return None,
            }
        } else {
            break w;
        }
    };
    // The command: what follows the image, verbatim (clap's trailing
    // arguments), unless its first word would read as a flag.
    let command: Vec<String> = words.map(str::to_string).collect();
    if command.first().is_some_and(|w| w.starts_with('-')) || (f.detach && f.tty) {
        return None;
    }
    let env = |name: &str| -> Option<Option<String>> {
        match std::env::var_os(name) {
            None => Some(None),
            Some(v) if v.is_empty() => None,
            Some(v) => Some(Some(v.into_string().ok()?)),
        }
    };
    let globals = AppGlobals {
        root: env(ENV_ROOT)?.unwrap_or_else(|| DEFAULT_ROOT.into()).into(),
        baked_apps: env(ENV_BAKED_APPS)?
            .unwrap_or_else(|| cairn_contracts::image::BAKED_APPS_DIR.into())
            .into(),
        bridge: env(ENV_BRIDGE)?,
        subnet: env(ENV_SUBNET)?,
        node_network: env(ENV_NODE_NETWORK)?
            .unwrap_or_else(|| NODE_NETWORK.into())
            .into(),
    };
    let run = RunArgs {
        name: f.name,
        detach: f.detach,
        interactive: f.interactive,
        tty: f.tty,
        rm: f.rm,
        memory: f.memory,
        cpus: f.cpus,
        cpu_weight: f.cpu_weight,
        pids: f.pids,
        ip: f.ip,
        network: f.network.unwrap_or(DEFAULT_NETWORK).to_string(),
        env: f.env,
        volume: f.volume,
        health_cmd: f.health_cmd,
        health_interval: match f.health_interval {
            Some(d) => d,
            None => parse_duration(DEFAULT_HEALTH_INTERVAL).ok()?,
        },
        health_retries: f.health_retries.unwrap_or(DEFAULT_HEALTH_RETRIES),
        services: f.services,
        registration_dir: match f.registration_dir {
            Some(dir) => dir,
            None => env(ENV_REGISTRATION_DIR)?
                .unwrap_or_else(|| REGISTRATION_DIR.into())
                .into(),
        },
        restart: match f.restart {
            Some(r) => r,
            None => parse_restart(DEFAULT_RESTART).ok()?,
        },
        stop_timeout: f.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT),
        log_max_size: match f.log_max_size {
            Some(s) => s,
            None => parse_size(DEFAULT_LOG_MAX_SIZE).ok()?,
        },
        log_max_files: f.log_max_files.unwrap_or(DEFAULT_LOG_MAX_FILES),
        userns: f.userns.unwrap_or(DEFAULT_USERNS).to_string(),
        image: image.to_string(),
        command,
    };
    Some(QuickRun {
        verbose,
        globals,
        run,
    })
}

/// `app run`'s flags as they are read; `None` is "not given".
#[derive(Default)]
struct Flags {
    detach: bool,
    interactive: bool,
    tty: bool,
    rm: bool,
    name: Option<String>,
    memory: Option<u64>,
    cpus: Option<u64>,
    cpu_weight: Option<u64>,
    pids: Option<u64>,
    ip: Option<std::net::Ipv4Addr>,
    network: Option<&'static str>,
    env: Vec<String>,
    volume: Vec<Volume>,
    health_cmd: Option<String>,
    health_interval: Option<Duration>,
    health_retries: Option<u32>,
    services: Vec<ServicePort>,
    registration_dir: Option<PathBuf>,
    restart: Option<RestartPolicy>,
    stop_timeout: Option<u64>,
    log_max_size: Option<u64>,
    log_max_files: Option<u32>,
    userns: Option<&'static str>,
}

impl Flags {
    /// The switch named by a long flag.
    fn switch(&mut self, flag: &str) -> Option<&mut bool> {
        Some(match flag {
            "detach" => &mut self.detach,
            "interactive" => &mut self.interactive,
            "tty" => &mut self.tty,
            "rm" => &mut self.rm,
            _ => return None,
        })
    }

    /// Takes `value` for the long flag `flag`; `None` leaves the line to
    /// clap.
    fn value(&mut self, flag: &str, value: &str) -> Option<()> {
        if value.is_empty() || value.starts_with('-') {
            return None;
        }
        /// Sets a flag given once; a second time is clap's to refuse.
        fn once<T>(slot: &mut Option<T>, v: Option<T>) -> Option<()> {
            match slot {
                Some(_) => None,
                None => {
                    *slot = Some(v?);
                    Some(())
                }
            }
        }
        /// Only plain digits: clap's integer parsers also take a sign.
        fn number<T: std::str::FromStr>(v: &str) -> Option<T> {
            v.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| v.parse().ok())?
        }
        match flag {
            "name" => once(&mut self.name, Some(value.to_string())),
            "memory" => once(&mut self.memory, parse_memory(value).ok()),
            "cpus" => once(&mut self.cpus, parse_cpus(value).ok()),
            "cpu-weight" => once(&mut self.cpu_weight, parse_cpu_weight(value).ok()),
            "pids" => once(&mut self.pids, parse_pids(value).ok()),
            "ip" => once(&mut self.ip, value.parse().ok()),
            "network" => once(
                &mut self.network,
                NETWORKS.into_iter().find(|v| *v == value),
            ),
            "env" => {
                self.env.push(value.to_string());
                Some(())
            }
            "volume" => {
                self.volume.push(parse_volume(value).ok()?);
                Some(())
            }
            "health-cmd" => once(&mut self.health_cmd, Some(value.to_string())),
            "health-interval" => once(&mut self.health_interval, parse_duration(value).ok()),
            "health-retries" => once(&mut self.health_retries, number(value)),
            "service" => {
                self.services.push(parse_service(value).ok()?);
                Some(())
            }
            "registration-dir" => once(&mut self.registration_dir, Some(value.into())),
            "restart" => once(&mut self.restart, parse_restart(value).ok()),
            "stop-timeout" => once(&mut self.stop_timeout, number(value)),
            "log-max-size" => once(&mut self.log_max_size, parse_size(value).ok()),
            "log-max-files" => once(
                &mut self.log_max_files,
                number::<u32>(value).filter(|n| LOG_MAX_FILES.contains(&i64::from(*n))),
            ),
            "userns" => once(
                &mut self.userns,
                USERNS_MODES.into_iter().find(|v| *v == value),
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    fn argv(line: &str) -> Vec<OsString> {
        std::iter::once("host")
            .chain(line.split(' ').filter(|w| !w.is_empty()))
            .map(|w| w.replace('_', " ").into())
            .collect()
    }

    /// Both readings of `line` (`_` stands for a space inside a word).
    fn both(line: &str) -> (Option<String>, Option<String>) {
        let args = argv(line);
        let quick = quick_run(&args).map(|q| format!("{:?}", (q.verbose, q.globals, q.run)));
        let clap = ContainerCli::try_parse_from(&args).ok().and_then(|c| {
            let ContainerTop::App { globals, command } = c.command;
            match command {
                ContainerSub::Run(run) => Some(format!("{:?}", (c.verbose, globals, *run))),
                _ => None,
            }
        });
        (quick, clap)
    }

    #[test]
    fn the_quick_reading_is_clap_s() {
        let dir = std::env::temp_dir();
        let volume = format!("{}:/data:ro", dir.display());
        let read_quickly = [
            "app run busybox".to_string(),
            "app run --rm --network none busybox /bin/true".into(),
            "-vv app run --rm --network=none busybox /bin/true".into(),
            "--verbose -v app run -it --name web busybox sh -c echo_hi --rm -x".into(),
            "app run -di --name=web --userns host busybox".into(),
            "app run -d -i --userns=auto --restart always --stop-timeout 5 web:1".into(),
            "app run -e A=1 -e B=2 --env C=3 --env=D=4=5 busybox env".into(),
            format!("app run -v {volume} --volume={volume} busybox ls /data"),
            "app run --memory 64M --cpus=0.5 --cpu-weight 200 --pids 16 busybox".into(),
            "app run --ip 10.88.0.50 --service web:8080 --service=db busybox".into(),
            "app run --health-cmd wget_-q_localhost --health-interval 500ms \
             --health-retries 2 busybox"
                .into(),
            "app run --log-max-size 1M --log-max-files 100 --registration-dir /x busybox".into(),
            "app run --log-max-files 1 --restart on-failure busybox true".into(),
            "app run sha256:0123 a b c".into(),
        ];
        for line in &read_quickly {
            let (quick, clap) = both(line);
            assert!(quick.is_some(), "{line}: not read quickly");
            assert_eq!(quick, clap, "{line}");
        }
        // Left to clap, which parses some and refuses others.
        for line in [
            "app --root /srv run busybox",
            "app run --root /srv busybox",
            "app run --bridge b0 busybox",
            "app run -- busybox",
            "app run -eA=1 busybox",
            "app run --name a --name b busybox",
            "app run --rm --rm busybox",
            "app run -tt busybox",
            "app run --rm=true busybox",
            "app run -d -t busybox",
            "app run --name -x busybox",
            "app run --name= busybox",
            "app run --memory 12Q busybox",
            "app run --memory 12 busybox",
            "app run --cpus 0 busybox",
            "app run --stop-timeout +5 busybox",
            "app run --network host busybox",
            "app run --userns keep-id busybox",
            "app run --log-max-files 0 busybox",
            "app run --log-max-files 101 busybox",
            "app run --health-interval 1x busybox",
            "app run -v /nonexistent-src:/data busybox",
            "app run --ip 10.88.0 busybox",
            "app run --restart sometimes busybox",
            "app run --unknown busybox",
            "app run -x busybox",
            "app run - busybox",
            "app run --help",
            "app run -h",
            "app run",
            "app run busybox --rm",
            "app ps",
            "app",
            "status",
            "-x app run busybox",
        ] {
            let (quick, _) = both(line);
            assert!(quick.is_none(), "{line}: read quickly as {quick:?}");
        }
        let bad = [OsString::from("host"), "app".into(), "run".into(), {
            use std::os::unix::ffi::OsStringExt;
            OsString::from_vec(vec![0xff])
        }];
        assert!(quick_run(&bad).is_none());
    }

    /// Random lines from words of every kind: whatever the quick reading
    /// takes, clap must read the same.
    #[test]
    fn random_lines_read_quickly_read_the_same_with_clap() {
        const WORDS: &[&str] = &[
            "-v",
            "-vv",
            "--verbose",
            "app",
            "run",
            "ps",
            "--rm",
            "-d",
            "-i",
            "-t",
            "-it",
            "-dit",
            "-di",
            "-td",
            "--detach",
            "--tty",
            "--interactive",
            "--name",
            "web",
            "--name=web",
            "-e",
            "A=1",
            "--env",
            "--env=B=2",
            "--network",
            "none",
            "bridge",
            "--network=none",
            "--userns",
            "host",
            "auto",
            "--userns=host",
            "--memory",
            "64M",
            "--memory=12Q",
            "--cpus",
            "0.5",
            "0",
            "--pids",
            "16",
            "--ip",
            "10.88.0.5",
            "--restart",
            "always",
            "on-failure",
            "--stop-timeout",
            "5",
            "+5",
            "-1",
            "--log-max-files",
            "3",
            "101",
            "--log-max-size",
            "1M",
            "--health-cmd",
            "true",
            "--health-interval",
            "1s",
            "10ms",
            "--health-retries",
            "2",
            "--service",
            "web:80",
            "--registration-dir",
            "/x",
            "--root",
            "/srv",
            "--bridge=b0",
            "--",
            "-x",
            "-",
            "busybox",
            "sh",
            "-c",
            "/tmp:/data",
            "--volume",
            "-h",
            "--help",
            "=",
            "--=",
            "-e=A",
        ];
        // A fixed generator: the same lines on every run.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut quick = 0;
        for _ in 0..5_000 {
            let mut line: Vec<&str> = Vec::new();
            if next(10) < 8 {
                line.extend(["app", "run"]);
            }
            for _ in 0..next(9) {
                line.push(WORDS[next(WORDS.len())]);
            }
            if next(2) == 0 {
                line.push("busybox");
            }
            let (q, clap) = both(&line.join(" "));
            if q.is_some() {
                quick += 1;
                assert_eq!(q, clap, "{line:?}");
            }
        }
        // Not a test of nothing: a good share of the lines was read quickly.
        assert!(quick > 250, "only {quick} lines read quickly");
        eprintln!("{quick} of 5000 lines read quickly, as clap reads them");
    }

    /// Every flag of `app run` that clap knows is one the quick reading
    /// takes or leaves to clap on purpose; a new flag fails here until it
    /// is read both ways.
    #[test]
    fn every_run_flag_is_read_quickly() {
        let cmd = ContainerCli::command();
        let app = cmd.find_subcommand("app").unwrap().clone();
        let mut app = app;
        app.build();
        let run = app.find_subcommand("run").unwrap();
        let globals = ["root", "baked-apps", "bridge", "subnet", "node-network"];
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            if globals.contains(&long) || long == "help" {
                continue;
            }
            let known = Flags::default().switch(long).is_some() || {
                // Values "x" cannot be: try each flag's own example.
                let sample = match long {
                    "memory" => "64M",
                    "cpus" => "1",
                    "cpu-weight" | "pids" | "health-retries" | "stop-timeout" | "log-max-files" => {
                        "2"
                    }
                    "ip" => "10.0.0.1",
                    "network" => "none",
                    "volume" => "/tmp:/t",
                    "health-interval" => "1s",
                    "restart" => "always",
                    "log-max-size" => "1M",
                    "userns" => "host",
                    _ => "x",
                };
                Flags::default().value(long, sample).is_some()
            };
            assert!(known, "--{long} is not read by quick_run");
        }
    }
}
