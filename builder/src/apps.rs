//! Apps baked into the host tree (`[[apps]]`): each image is verified at
//! compose time (every blob's sha256, and the manifest digest against the
//! pin), shipped in the tree under `/usr/lib/cairn/apps/<name>/`, and started
//! at boot by `cairn-app-<name>.service`, which imports it (deduplicated, so
//! only the first boot of a new image writes anything) and runs it pinned by
//! digest. The image is part of the host commit: host and app update and
//! roll back together.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::manifest::App;

pub const APPS_DIR: &str = "usr/lib/cairn/apps";

pub fn unit_name(app: &App) -> String {
    format!("cairn-app-{}.service", app.name)
}

/// The runtime's name for a baked image.
fn image_name(app: &App) -> String {
    format!("cairn-app-{}:baked", app.name)
}

/// Verifies, copies and wires up every app; returns `name@digest` lines for
/// commit metadata. `scratch` is a work directory for verification.
pub fn bake(root: &crate::confined::Root, apps: &[App], scratch: &Path) -> Result<Vec<String>> {
    let mut baked = Vec::new();
    for app in apps {
        let ctx = || format!("apps: {} ({})", app.name, app.image.display());
        let verify_repo = scratch.join(format!("verify-{}", app.name));
        let repo = ostree::Repo::new_for_path(&verify_repo);
        std::fs::create_dir_all(&verify_repo)?;
        repo.create(ostree::RepoMode::BareUser, ostree::gio::Cancellable::NONE)
            .with_context(|| format!("creating {}", verify_repo.display()))?;
        let info = cairn_oci::image::import(&repo, &app.image, Some(&image_name(app)))
            .with_context(ctx)?;
        if info.manifest_digest != app.digest {
            bail!(
                "apps: {}: the image at {} has manifest digest {}, but the manifest pins {}; \
                 update `digest` if this image is the one you mean to ship",
                app.name,
                app.image.display(),
                info.manifest_digest,
                app.digest
            );
        }
        if app.command.is_empty() && info.config.entrypoint.is_empty() && info.config.cmd.is_empty()
        {
            bail!(
                "apps: {}: the image has no Entrypoint or Cmd; give `command`",
                app.name
            );
        }
        let _ = std::fs::remove_dir_all(&verify_repo);

        // (app.name is validated: one lowercase word, no '/'.)
        let dir = format!("/{APPS_DIR}/{}", app.name);
        root.dir(&dir, true)?;
        let in_tree = if app.image.is_dir() {
            // Copied next to the tree first, then renamed in: cp never
            // writes through a path of the tree.
            let staged = scratch.join(format!("image-{}", app.name));
            crate::stage::copy_tree(&app.image, &staged)?;
            let at = root.at(format!("{dir}/image"), false)?;
            at.remove()?;
            std::fs::rename(&staged, at.path())
                .with_context(|| format!("moving the image of {} into {dir}/image", app.name))?;
            format!("{dir}/image")
        } else {
            crate::tree::install_file(root, &app.image, &format!("{dir}/image.tar"), 0o644)?;
            format!("{dir}/image.tar")
        };
        let unit = format!("/usr/lib/systemd/system/{}", unit_name(app));
        root.write(&unit, unit_text(app, Path::new(&in_tree)).as_bytes(), 0o644)
            .with_context(|| format!("writing {unit}"))?;
        crate::tree::apply_units(root, &[unit_name(app)], &[], &[])?;
        baked.push(format!("{}@{}", app.name, app.digest));
    }
    Ok(baked)
}

/// One argument of an Exec line, quoted for systemd (which also expands
/// `%` specifiers and `$` variables, so both are escaped).
fn quote(arg: &str) -> String {
    let escaped = arg
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
        .replace('$', "$$");
    format!("\"{escaped}\"")
}

pub fn unit_text(app: &App, image_in_tree: &Path) -> String {
    let mut run = vec![
        "/usr/bin/host".to_string(),
        "app".into(),
        "run".into(),
        "--detach".into(),
        "--name".into(),
        app.name.clone(),
        "--restart".into(),
        app.restart.clone().unwrap_or_else(|| "always".into()),
    ];
    let mut opt = |flag: &str, v: &Option<String>| {
        if let Some(v) = v {
            run.push(flag.into());
            run.push(v.clone());
        }
    };
    opt("--memory", &app.memory);
    opt("--cpus", &app.cpus);
    opt("--pids", &app.pids);
    opt("--ip", &app.ip.map(|ip| ip.to_string()));
    opt("--health-cmd", &app.health_cmd);
    opt("--health-interval", &app.health_interval);
    for e in &app.env {
        run.push("--env".into());
        run.push(e.clone());
    }
    let name = image_name(app);
    let repo_name = name.split(':').next().unwrap_or(&name);
    run.push(format!("{repo_name}@{}", app.digest));
    run.extend(app.command.iter().cloned());
    let exec = |args: &[String]| args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ");

    let mut t = String::new();
    writeln!(
        t,
        "# Generated by cairn compose from the manifest's [[apps]] entry {:?}.",
        app.name
    )
    .ok();
    writeln!(t, "[Unit]").ok();
    writeln!(
        t,
        "Description=cairn app {} (image {})",
        app.name, app.digest
    )
    .ok();
    writeln!(t, "Wants=network-online.target").ok();
    writeln!(
        t,
        "After=network-online.target systemd-networkd.service local-fs.target"
    )
    .ok();
    writeln!(t, "\n[Service]").ok();
    writeln!(t, "Type=oneshot").ok();
    writeln!(t, "RemainAfterExit=yes").ok();
    writeln!(
        t,
        "ExecStartPre={}",
        exec(&[
            "/usr/bin/host".into(),
            "app".into(),
            "import".into(),
            image_in_tree.display().to_string(),
            "--name".into(),
            name.clone(),
        ])
    )
    .ok();
    let remove = exec(&[
        "/usr/bin/host".into(),
        "app".into(),
        "rm".into(),
        "--force".into(),
        app.name.clone(),
    ]);
    // A container record from the previous boot is replaced, never reused.
    writeln!(t, "ExecStartPre=-{remove}").ok();
    writeln!(t, "ExecStart={}", exec(&run)).ok();
    // The image the previous tree baked in is untagged now: drop it, so the
    // node's app store does not grow with every upgrade and rollback (the
    // tree keeps its own copy to import again). Best effort.
    writeln!(
        t,
        "ExecStartPost=-{}",
        exec(&["/usr/bin/host".into(), "app".into(), "prune".into()])
    )
    .ok();
    writeln!(t, "ExecStop={remove}").ok();
    writeln!(t, "\n[Install]\nWantedBy=multi-user.target").ok();
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_quote_for_systemd_and_pin_the_digest() {
        let app = App {
            name: "web".into(),
            image: "web.tar".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            command: vec!["/bin/sh".into(), "-c".into(), "echo \"$HOME\" 100%".into()],
            env: vec!["MODE=prod".into()],
            memory: Some("64M".into()),
            cpus: None,
            pids: Some("32".into()),
            ip: Some("10.88.0.50".parse().unwrap()),
            health_cmd: None,
            health_interval: None,
            restart: None,
        };
        let text = unit_text(&app, Path::new("/usr/lib/cairn/apps/web/image.tar"));
        assert!(text.contains(
            "ExecStartPre=\"/usr/bin/host\" \"app\" \"import\" \"/usr/lib/cairn/apps/web/image.tar\" \"--name\" \"cairn-app-web:baked\"\n"
        ));
        assert!(
            text.contains("ExecStartPre=-\"/usr/bin/host\" \"app\" \"rm\" \"--force\" \"web\"\n")
        );
        assert!(text.contains("ExecStop=\"/usr/bin/host\" \"app\" \"rm\" \"--force\" \"web\"\n"));
        assert!(text.contains("ExecStartPost=-\"/usr/bin/host\" \"app\" \"prune\"\n"));
        let exec = text.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        assert!(exec.contains("\"--restart\" \"always\" \"--memory\" \"64M\" \"--pids\" \"32\" \"--ip\" \"10.88.0.50\" \"--env\" \"MODE=prod\""), "{exec}");
        assert!(
            exec.contains(&format!("\"cairn-app-web@sha256:{}\"", "a".repeat(64))),
            "{exec}"
        );
        assert!(
            exec.ends_with("\"/bin/sh\" \"-c\" \"echo \\\"$$HOME\\\" 100%%\""),
            "{exec}"
        );
        assert!(text.contains("[Install]\nWantedBy=multi-user.target\n"));
    }
}
