//! Apps baked into the host tree (`[[apps]]`): each image is verified at
//! compose time (every blob's sha256, and the manifest digest against the
//! pin) and unpacked into the tree under `/usr/lib/cairn/apps/<name>/`
//! (`rootfs/` and its record `image.json`, the layout
//! `cairn_contracts::image` owns), and started at boot by
//! `cairn-app-<name>.service`, which runs it from the booted deployment.
//!
//! So an app's files are objects of the host commit: stored once on a node
//! (shared with the host and other apps where identical), updated by the
//! delta of the files that changed, rolled back with the host, and never
//! imported or pulled by the node. An image comes from an OCI layout or
//! archive next to the manifest, or from a registry: a tag is resolved to a
//! digest before anything is composed (it is part of the input hash and
//! the lock), so what is baked is what was resolved.

use std::path::Path;

use anyhow::{bail, Context, Result};

use cairn_contracts::image::{
    baked_image_name, ImageInfo, BAKED_APPS_DIR, BAKED_RECORD, BAKED_ROOTFS, BAKED_TAG,
};
use cairn_contracts::units::{app_unit_name, app_unit_text, AppRun, AppUnit};
use cairn_oci::image::ImportOptions;
use cairn_oci::registry::{self, Client, ClientOptions, PullOptions, Quiet, Resolved};

use crate::lock::LockedApp;
use crate::manifest::App;

pub fn unit_name(app: &App) -> String {
    app_unit_name(&app.name)
}

/// An app whose image is known before the compose starts.
pub struct Prepared<'a> {
    pub app: &'a App,
    /// A registry image, resolved to what is baked.
    registry: Option<(Client, Resolved)>,
}

impl Prepared<'_> {
    /// What the registry reference resolved to (None for a file image).
    pub fn resolved_digest(&self) -> Option<String> {
        self.registry.as_ref().map(|(_, r)| r.digest.to_string())
    }

    /// The lock's entry for a registry app.
    pub fn locked(&self) -> Option<LockedApp> {
        Some(LockedApp {
            name: self.app.name.clone(),
            image: self.app.image.to_string_lossy().into_owned(),
            digest: self.resolved_digest()?,
        })
    }
}

/// Resolve every registry app to a digest: the manifest's pin, else the
/// lock's (`--lock`), else what the tag names now. Registry access follows
/// the build machine's container configuration (registries.conf,
/// containers-auth.json), as podman's does.
pub fn prepare<'a>(apps: &'a [App], lock: Option<&[LockedApp]>) -> Result<Vec<Prepared<'a>>> {
    let mut out = Vec::new();
    for app in apps {
        let Some(reference) = &app.registry else {
            out.push(Prepared {
                app,
                registry: None,
            });
            continue;
        };
        let image = app.image.to_string_lossy();
        let locked = lock
            .and_then(|l| l.iter().find(|e| e.name == app.name && e.image == image))
            .map(|e| cairn_oci::source::Sha256::parse(&e.digest))
            .transpose()?;
        let pin = match (&reference.digest, app.digest.as_str(), locked) {
            (Some(d), _, _) => Some(d.clone()),
            (None, d, _) if !d.is_empty() => Some(cairn_oci::source::Sha256::parse(d)?),
            (None, _, l) => l,
        };
        let target = match &pin {
            Some(d) => reference.pinned(d),
            None => reference.clone(),
        };
        let ctx = || format!("apps: {} ({target})", app.name);
        let client =
            Client::connect(&target, &ClientOptions::default(), &Quiet).with_context(ctx)?;
        let resolved = registry::resolve(&client, &target, &PullOptions::default(), &Quiet)
            .with_context(ctx)?;
        if !app.digest.is_empty()
            && app.digest != resolved.digest.to_string()
            && app.digest != resolved.manifest_digest.to_string()
        {
            bail!(
                "apps: {}: {target} is {}, but the manifest pins {}",
                app.name,
                resolved.digest,
                app.digest
            );
        }
        out.push(Prepared {
            app,
            registry: Some((client, resolved)),
        });
    }
    Ok(out)
}

/// Verifies and unpacks every app into the tree and wires up its unit;
/// returns `name@manifest-digest` lines for commit metadata. `scratch` is a
/// work directory on the tree's file system.
pub fn bake(
    root: &crate::confined::Root,
    apps: &[Prepared],
    scratch: &Path,
) -> Result<Vec<String>> {
    let mut baked = Vec::new();
    for p in apps {
        let app = p.app;
        let ctx = || format!("apps: {} ({})", app.name, app.image.display());
        let work = scratch.join(format!("app-{}", app.name));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let source = match &p.registry {
            Some((client, resolved)) => {
                let layout = work.join("layout");
                registry::pull_layout(client, resolved, &layout, &PullOptions::default(), &Quiet)
                    .with_context(ctx)?;
                layout
            }
            None => app.image.clone(),
        };
        let name = baked_image_name(&app.name);
        let rootfs = work.join(BAKED_ROOTFS);
        let image = cairn_oci::image::unpack(
            &source,
            &ImportOptions {
                name: Some(format!("{name}:{BAKED_TAG}")),
                ..Default::default()
            },
            &rootfs,
        )
        .with_context(ctx)?;
        let stripped = cairn_oci::image::strip_privileges(&rootfs).with_context(ctx)?;
        if stripped > 0 {
            tracing::info!(
                "apps: {}: {stripped} setuid, setgid or file-capability bits cleared",
                app.name
            );
        }
        let manifest_digest = image.manifest_digest.to_string();
        if p.registry.is_none() && manifest_digest != app.digest {
            bail!(
                "apps: {}: the image at {} has manifest digest {manifest_digest}, but the manifest pins {}; \
                 update `digest` if this image is the one you mean to ship",
                app.name,
                app.image.display(),
                app.digest
            );
        }
        if app.command.is_empty()
            && image.config.entrypoint.is_empty()
            && image.config.cmd.is_empty()
        {
            bail!(
                "apps: {}: the image has no Entrypoint or Cmd; give `command`",
                app.name
            );
        }
        let record = ImageInfo {
            name,
            tag: BAKED_TAG.into(),
            ostree_ref: String::new(),
            commit: String::new(),
            manifest_digest: manifest_digest.clone(),
            config: image.config,
        };

        // (app.name is validated: one lowercase word, no '/'.) The app's
        // directory is root's alone: the image's setuid files are not for
        // the host's users.
        let dir = format!("{BAKED_APPS_DIR}/{}", app.name);
        root.dir(&dir, true)?;
        root.at(&dir, false)?.chmod_dir(0o700)?;
        let at = root.at(format!("{dir}/{BAKED_ROOTFS}"), false)?;
        at.remove()?;
        // Unpacked next to the tree, then renamed in: nothing is written
        // through a path of the tree.
        std::fs::rename(&rootfs, at.path())
            .with_context(|| format!("moving the image of {} into {dir}", app.name))?;
        root.write(
            format!("{dir}/{BAKED_RECORD}"),
            &serde_json::to_vec_pretty(&record)?,
            0o644,
        )
        .with_context(|| format!("writing {dir}/{BAKED_RECORD}"))?;
        let _ = std::fs::remove_dir_all(&work);

        let unit = format!("/usr/lib/systemd/system/{}", unit_name(app));
        root.write(&unit, unit_text(app, &manifest_digest).as_bytes(), 0o644)
            .with_context(|| format!("writing {unit}"))?;
        crate::tree::apply_units(root, &[unit_name(app)], &[], &[])?;
        baked.push(format!("{}@{manifest_digest}", app.name));
    }
    Ok(baked)
}

/// The unit that runs baked app `app` from the booted tree, pinned to the
/// manifest digest it was baked with.
pub fn unit_text(app: &App, manifest_digest: &str) -> String {
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
        image: format!("{}@{manifest_digest}", baked_image_name(&app.name)),
        command: &app.command,
    };
    app_unit_text(&AppUnit {
        name: &app.name,
        generated_by: &format!(
            "cairn compose from the manifest's [[apps]] entry {:?}",
            app.name
        ),
        description: format!("cairn app {} (image {manifest_digest})", app.name),
        prepare: None,
        run_args: run.args(),
        after_start: None,
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
            registry: None,
        };
        let text = unit_text(&app, &app.digest);
        assert!(
            !text.contains("\"import\""),
            "a baked app runs from the tree: {text}"
        );
        assert!(
            text.contains("ExecStartPre=-\"/usr/bin/host\" \"app\" \"rm\" \"--force\" \"web\"\n")
        );
        assert!(text.contains("ExecStop=\"/usr/bin/host\" \"app\" \"rm\" \"--force\" \"web\"\n"));
        assert!(!text.contains("ExecStartPost"), "{text}");
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
