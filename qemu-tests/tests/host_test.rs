//! `host test boot` (issue 18) proven by running it: the real runner, as a
//! user runs it, on the apps test image (written by whichever test needs it first; a
//! plain cairn image with openssh-server, provisioned through fw_cfg).
//!
//! 1. One run, one machine, five checks: one passes, one fails (exit
//!    status, TAP, JUnit, the console, journal and output saved), one times
//!    out, one reboots the machine once (autopkgtest's mark API) and passes
//!    on its second run, and one reaches the build machine's loopback port
//!    given with `--forward` and no other (another listener there sees no
//!    connection). The time to the first check is printed beside the
//!    console's first login prompt of the same boot.
//! 2. A disk that does not boot: a clear error within the boot timeout,
//!    not a hang.
//!
//! Run with `cargo test -p qemu-tests --test host_test -- --test-threads=1` as root.

#[path = "support/apps_image.rs"]
mod apps_image;

use std::process::Command;
use std::time::{Duration, Instant};

use apps_image::*;
use qemu_tests::fixture::{build_dir, host_binary, write_check};

fn workdir(name: &str) -> std::path::PathBuf {
    let d = build_dir("qemu-tests/runs").join(format!("host-test-{name}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn checks_pass_fail_time_out_and_reboot_in_one_run() {
    let image = apps_image();
    let work = workdir("checks");
    let checks = work.join("checks");
    std::fs::create_dir(&checks).unwrap();
    write_check(
        &checks,
        "10-pass",
        "#!/bin/sh\nset -e\nhost status\ntest \"$(id -u)\" = 0\ntest \"$CAIRN_TEST_PHASE\" = boot\necho check-passed\n",
    );
    write_check(
        &checks,
        "20-fail",
        "#!/bin/sh\necho about to fail\necho on stderr >&2\nexit 3\n",
    );
    write_check(
        &checks,
        "30-timeout",
        "#!/bin/sh\n# cairn-test: timeout = 5s\nsleep 600\n",
    );
    write_check(
        &checks,
        "40-reboot",
        r#"#!/bin/sh
# cairn-test: reboot = true
# cairn-test: timeout = 2m
boot_id=$(cat /proc/sys/kernel/random/boot_id)
case "$CAIRN_TEST_REBOOT_MARK" in
"")
    echo "$boot_id" > /var/lib/cairn-test/first-boot
    cairn-test-reboot step-1
    echo "not reached"
    exit 1
    ;;
step-1)
    test "$AUTOPKGTEST_REBOOT_MARK" = step-1
    if [ "$boot_id" = "$(cat /var/lib/cairn-test/first-boot)" ]; then
        echo "same boot: no reboot happened"
        exit 1
    fi
    echo "rebooted, mark $CAIRN_TEST_REBOOT_MARK"
    ;;
*)
    echo "unexpected mark $CAIRN_TEST_REBOOT_MARK"
    exit 1
    ;;
esac
"#,
    );
    // The machine reaches a forwarded port of the build machine's loopback
    // and nothing else of it: another listener there sees no connection.
    let forwarded = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let not_forwarded = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (fwd, closed) = (
        forwarded.local_addr().unwrap().port(),
        not_forwarded.local_addr().unwrap().port(),
    );
    std::thread::spawn(move || {
        for conn in forwarded.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut &conn, b"forwarded-ok\n");
        }
    });
    not_forwarded.set_nonblocking(true).unwrap();
    write_check(
        &checks,
        "50-network",
        &format!(
            r#"#!/bin/sh
# cairn-test: timeout = 3m
reply=$(timeout 60 bash -c "exec 3<>/dev/tcp/$CAIRN_TEST_HOST/{fwd} && cat <&3")
test "$reply" = forwarded-ok || {{ echo "the forwarded port said: '$reply'"; exit 1; }}
for to in 10.0.2.2/{closed} 10.0.2.2/{fwd}; do
    if timeout 15 bash -c "exec 3<>/dev/tcp/$to" 2>/dev/null; then
        echo "reached the build machine at $to"; exit 1
    fi
done
echo "only the forwarded port answers"
"#
        ),
    );
    let junit = work.join("results.xml");
    let artifacts = work.join("artifacts");
    let started = Instant::now();
    let out = Command::new(must(host_binary()))
        .args(["test", "boot"])
        .arg(&image.image)
        .arg("--check")
        .arg(&checks)
        .args(["--forward", &fwd.to_string()])
        .arg("--junit")
        .arg(&junit)
        .arg("--artifacts")
        .arg(&artifacts)
        .args(["--memory", "1536M", "--boot-timeout", "15m"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{stdout}\n--- stderr ---\n{stderr}");
    eprintln!(
        "host_test: the run took {:.0} s:\n{all}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(out.status.code(), Some(1), "two checks fail: {all}");
    assert!(stdout.starts_with("TAP version 14\n1..5\n"), "{all}");
    assert!(stdout.contains("ok 1 - 10-pass\n"), "{all}");
    assert!(stdout.contains("not ok 2 - 20-fail\n"), "{all}");
    assert!(stdout.contains("exited with status 3"), "{all}");
    assert!(stdout.contains("    about to fail\n"), "{all}");
    assert!(stdout.contains("not ok 3 - 30-timeout\n"), "{all}");
    assert!(stdout.contains("timed out after 5 s"), "{all}");
    assert!(stdout.contains("ok 4 - 40-reboot\n"), "{all}");
    assert!(!stdout.contains("not ok 4"), "{all}");
    assert!(stdout.contains("ok 5 - 50-network\n"), "{all}");
    assert!(!stdout.contains("not ok 5"), "{all}");
    assert!(
        not_forwarded.accept().is_err(),
        "the machine reached a port that was not forwarded"
    );

    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("<testsuites tests=\"5\" failures=\"2\" errors=\"0\""),
        "{xml}"
    );
    assert!(
        xml.contains("<failure message=\"exited with status 3\"/>"),
        "{xml}"
    );
    assert!(xml.contains("rebooted, mark step-1"), "{xml}");

    let saved = artifacts.join("20-fail");
    let output = std::fs::read_to_string(saved.join("output.txt")).unwrap();
    assert!(
        output.contains("about to fail") && output.contains("on stderr"),
        "{output}"
    );
    let journal = std::fs::read_to_string(saved.join("journal.txt")).unwrap();
    assert!(
        journal.contains("systemd"),
        "the failed boot's journal: {journal:.2000}"
    );
    let serial = std::fs::read_to_string(saved.join("serial.log")).unwrap();
    assert!(serial.contains("Linux version"), "{serial:.2000}");
    assert!(
        !artifacts.join("10-pass").exists(),
        "nothing saved for a pass"
    );

    let figure = stderr
        .lines()
        .find(|l| l.contains("first check ran"))
        .unwrap_or("(no figure)");
    eprintln!("host_test: figures: {figure}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_disk_that_does_not_boot_is_a_clear_error_within_the_timeout() {
    let work = workdir("no-boot");
    let disk = work.join("blank.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let check = work.join("check");
    write_check(&work, "check", "#!/bin/sh\ntrue\n");
    let junit = work.join("results.xml");
    let started = Instant::now();
    let out = Command::new(must(host_binary()))
        .args(["test", "boot"])
        .arg(&disk)
        .arg("--check")
        .arg(&check)
        .arg("--junit")
        .arg(&junit)
        .arg("--artifacts")
        .arg(work.join("artifacts"))
        .args(["--boot-timeout", "30s"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        took < Duration::from_secs(120),
        "gave up after {took:?}, the boot timeout is 30 s"
    );
    assert!(stdout.contains("Bail out!"), "{stdout}");
    assert!(
        stderr.contains("did not come up") && stderr.contains("within 30 s"),
        "{stderr}"
    );
    assert!(work.join("artifacts/boot/serial.log").is_file());
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("errors=\"1\"") && xml.contains("did not come up"),
        "{xml}"
    );
    let _ = std::fs::remove_dir_all(&work);
}
