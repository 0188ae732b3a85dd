//! Apps baked into the host tree (`[[apps]]`): each image is verified at
//! compose time (every blob's sha256, and the manifest digest against the
//! pin), shipped in the tree under `/usr/lib/cairn/apps/<name>/`, and started
//! at boot by `cairn-app-<name>.service`, which imports it (deduplicated, so
//! only the first boot of a new image writes anything) and runs it pinned by
//! digest. The image is part of the host commit: host and app update and
//! roll back together.

use std::path::Path;

use anyhow::{bail, Context, Result};

use cairn_contracts::units::{app_unit_name, app_unit_text, host_command, AppRun, AppUnit};

use crate::manifest::App;

pub const APPS_DIR: &str = "usr/lib/cairn/apps";

pub fn unit_name(app: &App) -> String {
    app_unit_name(&app.name)
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

pub fn unit_text(app: &App, image_in_tree: &Path) -> String {
    let name = image_name(app);
    let repo_name = name.split(':').next().unwrap_or(&name);
    let run = AppRun {
        name: &app.name,
        restart: app.restart.as_deref(),
        memory: app.memory.as_deref(),
        cpus: app.cpus.as_deref(),
        pids: app.pids.as_deref(),
        ip: app.ip,
        health_cmd: app.health_cmd.as_deref(),
        health_interval: app.health_interval.as_deref(),
        services: &app.services,
        env: &app.env,
        image: format!("{repo_name}@{}", app.digest),
        command: &app.command,
    };
    let image = image_in_tree.display().to_string();
    app_unit_text(&AppUnit {
        name: &app.name,
        generated_by: &format!(
            "cairn compose from the manifest's [[apps]] entry {:?}",
            app.name
        ),
        description: format!("cairn app {} (image {})", app.name, app.digest),
        prepare: Some(host_command(&["app", "import", &image, "--name", &name])),
        run_args: run.args(),
        // The image the previous tree baked in is untagged now: drop it, so
        // the node's app store does not grow with every upgrade and rollback
        // (the tree keeps its own copy to import again). Best effort.
        after_start: Some(host_command(&["app", "prune"])),
        after_boot: false,
    })
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
            services: vec![],
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
