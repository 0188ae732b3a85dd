//! Start-to-exit latency of `/bin/true` from a busybox image inside the
//! booted cgroup-v2 cairn guest, side by side in one run: `host app run --rm`
//! (with its bridge NIC and with `--network none`), crun 1.8 (Debian's, from
//! `qemu-tests/manifests/bench-host.toml`, which the apps test image
//! leaves out) on a bundle of the same tree, and the bare
//! `unshare -mpnui -f --mount-proc chroot ROOTFS /bin/true` floor. Rounds are
//! interleaved so load changes hit every tool alike, each in a random order
//! (see the loop); `host app ps` shows what starting the `host` binary
//! costs, with no container started. With `NOPIE_HOST=FILE` (the same
//! `host` linked without PIE) one more row runs that binary, copied into
//! the guest over 9p. Also the memory (RSS) of the idle baked app's
//! monitor. Printed, never asserted.
//!
//! Run as root: `scripts/bench-runtime-guest [ROUNDS]` (or
//! `cargo run -p qemu-tests --example bench-runtime-guest -- [ROUNDS]`).
//! Under TCG every figure is several times what real hardware gives; the
//! ratios are what to read.

#[path = "../tests/support/apps_image.rs"]
mod apps_image;

use std::collections::BTreeMap;

use apps_image::*;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS is a number"))
        .unwrap_or(20);
    // The apps image with crun (its own build directory, apps-bench*).
    let image = bench_image();
    // NOPIE_HOST: the same host linked without PIE (scripts/bench-runtime-guest
    // builds it), shared into the guest over 9p for one more row.
    let nopie = std::env::var_os("NOPIE_HOST").map(std::path::PathBuf::from);
    let mut extra = Vec::new();
    if let Some(path) = &nopie {
        let dir = path.parent().expect("NOPIE_HOST is a file path");
        extra = vec![
            "-virtfs".to_string(),
            format!(
                "local,path={},mount_tag=nopie,security_model=none,readonly=on",
                dir.display()
            ),
        ];
    }
    eprintln!("bench: booting {}", image.image.display());
    let mut vm = boot_with(image, "bench", extra);
    if let Some(path) = &nopie {
        let name = path.file_name().unwrap().to_string_lossy();
        // A container command: only the container executable is copied in
        // (`--version` would be handed to a host-nopie-full there is not).
        must(vm.ok(&format!(
            "mkdir -p /run/nopie && mount -t 9p -o trans=virtio,version=9p2000.L,ro nopie /run/nopie && \
             cp /run/nopie/{name} /var/tmp/host-nopie && umount /run/nopie && /var/tmp/host-nopie app ps >/dev/null"
        )));
    }

    // One rootfs for crun and the floor: the image's layer, unpacked.
    must(vm.ok(
        "set -e; rm -rf /var/tmp/bench; mkdir -p /var/tmp/bench/bundle/rootfs; \
         cp -a /usr/lib/cairn/apps/web/rootfs/. /var/tmp/bench/bundle/rootfs/; \
         mkdir -p /var/tmp/bench/bundle/rootfs/proc /var/tmp/bench/bundle/rootfs/dev /var/tmp/bench/bundle/rootfs/sys; \
         cd /var/tmp/bench/bundle && crun spec && \
         sed -i 's/\"terminal\": true/\"terminal\": false/; s/^\\([[:space:]]*\\)\"sh\"$/\\1\"\\/bin\\/true\"/' config.json && \
         grep -q '\"/bin/true\"' config.json",
    ));
    // Warm-up: the first start of each makes checkouts and page cache.
    let crun_version = must(vm.ok("crun --version | head -1"));
    must(vm.ok(&format!(
        "host app run --rm {APP_IMAGE} /bin/true && \
         host app run --rm --network none {APP_IMAGE} /bin/true && \
         crun run -b /var/tmp/bench/bundle warm && \
         unshare -mpnui -f --mount-proc chroot /var/tmp/bench/bundle/rootfs /bin/true"
    )));
    if nopie.is_some() {
        must(vm.ok(&format!(
            "/var/tmp/host-nopie app run --rm --network none {APP_IMAGE} /bin/true"
        )));
    }

    let mut tools: Vec<(&str, String)> = vec![
        (
            "host app run --rm",
            format!("host app run --rm {APP_IMAGE} /bin/true"),
        ),
        (
            "host app run --rm --network none",
            format!("host app run --rm --network none {APP_IMAGE} /bin/true"),
        ),
        (
            "crun run",
            "crun run -b /var/tmp/bench/bundle bench$i".to_string(),
        ),
        (
            "unshare+chroot (floor)",
            "unshare -mpnui -f --mount-proc chroot /var/tmp/bench/bundle/rootfs /bin/true"
                .to_string(),
        ),
        // No container at all: what starting the `host` executable (the
        // one without libostree) costs, reading the records of one.
        ("host app ps (process start)", "host app ps".to_string()),
    ];
    if nopie.is_some() {
        tools.push((
            "same, host linked without PIE",
            format!("/var/tmp/host-nopie app run --rm --network none {APP_IMAGE} /bin/true"),
        ));
    }
    // Each round runs the tools in a new random order: a start leaves work
    // to the kernel (a network namespace and its veth are torn down
    // asynchronously, RCU grace periods), which lands on whatever runs next.
    // In a fixed order one tool always followed the bridged run and paid
    // for it (the same binary read 90 ms there and 68 ms elsewhere).
    let mut script = format!(
        "set -e; for i in $(seq {rounds}); do for n in $(shuf -i 0-{}); do\n\
         t0=$EPOCHREALTIME\ncase $n in\n",
        tools.len() - 1
    );
    for (n, (_, cmd)) in tools.iter().enumerate() {
        script.push_str(&format!("{n}) {cmd} >/dev/null;;\n"));
    }
    script.push_str("esac\nt1=$EPOCHREALTIME; echo \"$n $t0 $t1\"\ndone; done");
    let out = must(vm.run_timeout(
        &format!("bash -c '{}'", script.replace('\'', "'\\''")),
        std::time::Duration::from_secs(3600),
    ));
    if !out.success() {
        panic!("benchmark loop failed:\n{out}");
    }
    let mut times: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for line in out.stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [n, t0, t1] = f[..] {
            let (t0, t1): (f64, f64) = (t0.parse().unwrap(), t1.parse().unwrap());
            times
                .entry(n.parse().unwrap())
                .or_default()
                .push((t1 - t0) * 1000.0);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let medians: Vec<f64> = (0..tools.len())
        .map(|n| median(times.get_mut(&n).expect("timings for every tool")))
        .collect();
    let (crun, floor) = (medians[2], medians[3]);
    println!(
        "start-to-exit of /bin/true in the cairn guest (TCG, {} vCPUs, {rounds} interleaved rounds; {}):",
        2,
        crun_version.trim()
    );
    println!(
        "{:<34} {:>10} {:>9} {:>9}",
        "tool", "median ms", "÷ crun", "÷ floor"
    );
    for (n, (name, _)) in tools.iter().enumerate() {
        println!(
            "{:<34} {:>10.1} {:>9.2} {:>9.2}",
            name,
            medians[n],
            medians[n] / crun,
            medians[n] / floor
        );
    }

    // The target of issue #13, as a figure (a benchmark asserts nothing).
    let ratio = medians[1] / crun;
    println!(
        "target: host app run --rm --network none (PIE) <= 1.00x crun: {ratio:.2}x ({})",
        if ratio <= 1.0 { "met" } else { "NOT met" }
    );

    // Where the time of one run goes (-vv prints the phases).
    for _ in 0..3 {
        let phases = must(vm.ok(&format!(
            "host -vv app run --rm --network none {APP_IMAGE} /bin/true 2>&1 | sed 's/\x1b\\[[0-9;]*m//g'"
        )));
        println!(
            "phases of host -vv app run --rm --network none:\n{}",
            phases.trim_end()
        );
    }

    // Supervision memory: the idle baked app's monitor. From smaps_rollup,
    // which walks the page tables: the guest kernel (6.1) counts VmRSS in
    // /proc/PID/status per task and adds it up only every 64 faults, so a
    // process that faulted less since its exec shows a few kB there. Read
    // while it waits in host-monitor: each health check resumes it in
    // `host` for a moment, so the executable is read before and after the
    // figures, and the reading is taken again until both name host-monitor
    // (at most 5 s; then what was last seen is printed).
    let waiter = cairn_contracts::names::monitor_executable(std::path::Path::new("/usr/bin/host"));
    let waiter = waiter.display();
    let rss = must(vm.ok(&format!(
        "pid=$(host app inspect {APP} | sed -n 's/.*\"monitor_pid\": *\\([0-9]*\\).*/\\1/p'); \
         for try in $(seq 20); do \
           before=$(readlink /proc/$pid/exe); \
           figures=$(grep -E '^(Rss|Pss|Anonymous):' /proc/$pid/smaps_rollup | tr -s ' ' | tr '\\n' ' '); \
           after=$(readlink /proc/$pid/exe); \
           [ \"$before\" = \"$after\" ] && [ \"$after\" = {waiter} ] && break; \
           sleep 0.25; \
         done; \
         printf '%s: %s' \"$after\" \"$figures\""
    )));
    println!("monitor of the idle baked app: {}", rss.trim());
}
