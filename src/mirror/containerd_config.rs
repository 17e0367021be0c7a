//! Whether containerd reads the hosts.toml files pullgate keeps: its CRI registry `config_path`
//! (containerd ignores `hosts.toml` without it) must name `mirror.hosts_dir`.

use std::path::Path;

/// The CRI registry `config_path` of a containerd config file: version 2 configs (containerd 1.x,
/// and 2.x reading them) under `io.containerd.grpc.v1.cri`, version 3 under
/// `io.containerd.cri.v1.images`.
fn config_path(table: &toml::Table) -> Option<&str> {
    let plugins = table.get("plugins")?.as_table()?;
    ["io.containerd.cri.v1.images", "io.containerd.grpc.v1.cri"]
        .iter()
        .find_map(|p| {
            plugins
                .get(*p)?
                .get("registry")?
                .get("config_path")?
                .as_str()
        })
}

/// `Err` says why containerd will not fetch through pullgate's mirror.
pub fn check(file: &Path, hosts_dir: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read containerd's config {}: {e}", file.display()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        format!("{} is not valid TOML: {}", file.display(), e.message())
    })?;
    let want = hosts_dir.display().to_string();
    match config_path(&table) {
        None | Some("") => Err(format!(
            "{} sets no CRI registry config_path: containerd ignores hosts.toml files and never \
             fetches through pullgate's mirror; set config_path = {want:?}",
            file.display()
        )),
        Some(p) if p.split(':').any(|d| Path::new(d) == hosts_dir) => Ok(()),
        Some(p) => Err(format!(
            "{}: containerd's registry config_path is {p:?}, not mirror.hosts_dir {want:?}: \
             containerd does not read the hosts.toml files pullgate keeps",
            file.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_text(text: &str) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        std::fs::write(&f, text).unwrap();
        check(&f, Path::new("/etc/containerd/certs.d"))
    }

    #[test]
    fn config_path_is_found_in_both_config_versions() {
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        let v3 = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
        assert_eq!(check_text(v2), Ok(()));
        assert_eq!(check_text(v3), Ok(()));
        let unset = check_text("version = 2\n").unwrap_err();
        assert!(
            unset.contains("sets no CRI registry config_path"),
            "{unset}"
        );
        let other = check_text(&v2.replace("/etc/containerd/certs.d", "/srv/certs")).unwrap_err();
        assert!(other.contains("\"/srv/certs\""), "{other}");
        assert!(check_text("not [toml")
            .unwrap_err()
            .contains("not valid TOML"));
    }
}
