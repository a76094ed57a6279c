//! `--cgroups`: the benchmark's processes in cgroups of their own, as the kubelet puts every
//! container of a pod in its own. In one cgroup Linux shares the CPUs among runnable
//! *threads*, so a proxy's thread count decides how much CPU it takes from the load
//! generator and the app (BENCHMARKS.md, "Proxy threads"); with a cgroup each and equal
//! weights (`cpu.shares` 1024), it does not. Needs root and the cgroup v1 `cpu` controller.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

/// Where the cgroup v1 `cpu` controller is mounted.
const V1_CPU: &str = "/sys/fs/cgroup/cpu";

/// Cgroups made under this process's own `cpu` cgroup; removed on drop, their processes moved
/// back first.
pub(crate) struct Cgroups {
    /// The cgroup this process was in: where processes go back to.
    home: PathBuf,
    /// `home/custos-sidecar-bench-<pid>`, holding one cgroup per name.
    base: PathBuf,
    names: Vec<&'static str>,
}

impl Cgroups {
    /// Makes one cgroup per name, all with the default (equal) weight.
    pub(crate) fn create(names: &[&'static str]) -> Result<Self> {
        let mount = Path::new(V1_CPU);
        ensure!(
            mount.join("cpu.shares").exists(),
            "--cgroups needs the cgroup v1 cpu controller mounted at {V1_CPU} (this machine has none)"
        );
        let own = fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
        let relative = cpu_cgroup(&own).context("no cpu controller in /proc/self/cgroup")?;
        let home = mount.join(relative.trim_start_matches('/'));
        let base = home.join(format!("custos-sidecar-bench-{}", std::process::id()));
        fs::create_dir(&base)
            .with_context(|| format!("cannot create {} (--cgroups needs root)", base.display()))?;
        let mut cgroups = Cgroups { home, base, names: Vec::new() };
        for name in names {
            fs::create_dir(cgroups.base.join(name))
                .with_context(|| format!("cannot create the cgroup {name}"))?;
            cgroups.names.push(name);
        }
        Ok(cgroups)
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
    }
}

/// The path of the `cpu` controller's cgroup in `/proc/self/cgroup` text
/// (`hierarchy:controllers:path` lines, v1).
fn cpu_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers.split(',').any(|c| c == "cpu").then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cpu_controllers_cgroup() {
        let text = "9:name=systemd:/\n4:memory:/process_api/98\n2:cpuacct:/x\n1:cpu:/\n0::/\n";
        assert_eq!(cpu_cgroup(text), Some("/"));
        assert_eq!(cpu_cgroup("3:cpu,cpuacct:/kubepods/pod1/c2\n0::/\n"), Some("/kubepods/pod1/c2"));
        assert_eq!(cpu_cgroup("0::/user.slice\n"), None);
        assert_eq!(cpu_cgroup("2:cpuacct:/x\n"), None);
    }
}
