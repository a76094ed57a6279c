//! `--cgroups`: the benchmark's processes in cgroups of their own, as the kubelet puts every
//! container of a pod in its own. In one cgroup Linux shares the CPUs among runnable
//! *threads*, so a proxy's thread count decides how much CPU it takes from the load
//! generator and the app (BENCHMARKS.md, "Proxy threads"); with a cgroup each and equal
//! weights, it does not. Needs root and the `cpu` controller: cgroup v1 (`cpu.shares` 1024
//! each), or else cgroup v2 (`cpu.weight` 100 each).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where the cgroup v1 `cpu` controller is mounted.
const V1_CPU: &str = "/sys/fs/cgroup/cpu";

/// Cgroups made for the benchmark; removed on drop, their processes moved back first.
pub(crate) struct Cgroups {
    /// The cgroup this process was in: where processes go back to.
    home: PathBuf,
    /// `custos-sidecar-bench-<pid>`, holding one cgroup per name: under `home` in v1, under
    /// the root of the hierarchy in v2 (only the root may hold processes and hand a
    /// controller to its children).
    base: PathBuf,
    names: Vec<&'static str>,
    /// cgroup v2 (else v1).
    v2: bool,
    /// v2: the root's `cgroup.subtree_control`, when this run turned `cpu` on there.
    enabled_root_cpu: Option<PathBuf>,
}

impl Cgroups {
    /// Makes one cgroup per name, all with the default (equal) weight.
    pub(crate) fn create(names: &[&'static str]) -> Result<Self> {
        let own = fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
        let dir = format!("custos-sidecar-bench-{}", std::process::id());
        let v1 = Path::new(V1_CPU);
        let mut cgroups = match v1_cpu_cgroup(&own) {
            Some(relative) if v1.join("cpu.shares").exists() => {
                let home = v1.join(relative.trim_start_matches('/'));
                let base = home.join(&dir);
                Cgroups { home, base, names: Vec::new(), v2: false, enabled_root_cpu: None }
            }
            _ => Self::v2(&own, &dir)?,
        };
        fs::create_dir(&cgroups.base)
            .with_context(|| format!("cannot create {} (--cgroups needs root)", cgroups.base.display()))?;
        if cgroups.v2 {
            // Hand the cpu controller on to the benchmark's cgroups.
            let subtree = cgroups.base.join("cgroup.subtree_control");
            fs::write(&subtree, "+cpu")
                .with_context(|| format!("cannot enable cpu in {}", subtree.display()))?;
        }
        for name in names {
            fs::create_dir(cgroups.base.join(name))
                .with_context(|| format!("cannot create the cgroup {name}"))?;
            cgroups.names.push(name);
        }
        Ok(cgroups)
    }

    /// The cgroup v2 layout: `dir` under the hierarchy's root, with `cpu` turned on there if it
    /// was not.
    fn v2(own: &str, dir: &str) -> Result<Self> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
        let (Some(root), Some(relative)) = (v2_mount(&mountinfo), v2_cgroup(own)) else {
            bail!(
                "--cgroups needs the cpu controller of cgroup v1 (at {V1_CPU}) or cgroup v2; this machine has neither mounted"
            );
        };
        if !lists_cpu(&root.join("cgroup.controllers")) {
            bail!(
                "--cgroups: the cgroup v2 hierarchy at {} has no cpu controller (is it bound to cgroup v1?)",
                root.display()
            );
        }
        let subtree = root.join("cgroup.subtree_control");
        let enabled_root_cpu = if lists_cpu(&subtree) {
            None
        } else {
            fs::write(&subtree, "+cpu").with_context(|| {
                format!("cannot enable cpu in {} (--cgroups needs root)", subtree.display())
            })?;
            Some(subtree)
        };
        let home = root.join(relative.trim_start_matches('/'));
        Ok(Cgroups { home, base: root.join(dir), names: Vec::new(), v2: true, enabled_root_cpu })
    }

    /// How the CPU is shared among the cgroups, for the report.
    pub(crate) fn weights(&self) -> &'static str {
        if self.v2 { "cgroup v2, cpu.weight 100 each" } else { "cgroup v1, cpu.shares 1024 each" }
    }

    /// Moves the processes `pids` (with all their threads) into the cgroup `name`.
    pub(crate) fn join(&self, name: &str, pids: &[u32]) -> Result<()> {
        let procs = self.base.join(name).join("cgroup.procs");
        for pid in pids {
            fs::write(&procs, pid.to_string())
                .with_context(|| format!("cannot move process {pid} into {}", procs.display()))?;
        }
        Ok(())
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let home = self.home.join("cgroup.procs");
        for name in &self.names {
            let group = self.base.join(name);
            let procs = fs::read_to_string(group.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                let _ = fs::write(&home, pid);
            }
            let _ = fs::remove_dir(&group);
        }
        let _ = fs::remove_dir(&self.base);
        if let Some(subtree) = &self.enabled_root_cpu {
            // Fails, and is left on, when other cgroups use it meanwhile.
            let _ = fs::write(subtree, "-cpu");
        }
    }
}

/// Whether the controller list in the file `path` (`cgroup.controllers`,
/// `cgroup.subtree_control`) names `cpu`.
fn lists_cpu(path: &Path) -> bool {
    fs::read_to_string(path).unwrap_or_default().split_whitespace().any(|c| c == "cpu")
}

/// The path of the v1 `cpu` controller's cgroup in `/proc/self/cgroup` text
/// (`hierarchy:controllers:path` lines).
fn v1_cpu_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers.split(',').any(|c| c == "cpu").then_some(path)
    })
}

/// The path of the v2 cgroup in `/proc/self/cgroup` text (the `0::path` line).
fn v2_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo` text (the mount point
/// is field 5; the file system type follows the ` - ` separator).
fn v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs_type) = line.split_once(" - ")?;
        (fs_type.split_whitespace().next() == Some("cgroup2"))
            .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cpu_controllers_cgroup() {
        let text = "9:name=systemd:/\n4:memory:/process_api/98\n2:cpuacct:/x\n1:cpu:/\n0::/\n";
        assert_eq!(v1_cpu_cgroup(text), Some("/"));
        assert_eq!(v1_cpu_cgroup("3:cpu,cpuacct:/kubepods/pod1/c2\n0::/\n"), Some("/kubepods/pod1/c2"));
        assert_eq!(v1_cpu_cgroup("0::/user.slice\n"), None);
        assert_eq!(v1_cpu_cgroup("2:cpuacct:/x\n"), None);
        assert_eq!(
            v2_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"),
            Some("/user.slice/user-0.slice/session-3.scope")
        );
        assert_eq!(v2_cgroup(text), Some("/"));
        assert_eq!(v2_cgroup("1:cpu:/\n"), None);
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let unified = "24 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n\
                       30 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n";
        assert_eq!(v2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "33 27 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(v2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        // Optional fields before the separator do not shift the mount point.
        let tagged = "24 30 0:22 / /cg rw shared:9 master:2 - cgroup2 none rw\n";
        assert_eq!(v2_mount(tagged), Some(PathBuf::from("/cg")));
        assert_eq!(v2_mount("33 27 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"), None);
    }
}
