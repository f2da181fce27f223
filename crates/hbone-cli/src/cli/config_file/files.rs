//! `hbone config check` beyond syntax, as `nginx -t` does: the files a
//! config names are read as the commands would read them. Identities must
//! exist, parse, have a key that matches the certificate and that only its
//! owner may read (unless allow-insecure-key-permissions), and not be
//! expired; policy, routes, services, SOCKS5 credentials and revocation
//! list files must load.

use std::path::Path;

use super::{ConfigFile, Field, Section};

/// Every problem with the files `file` names, in the order of the file,
/// each as one line naming the file, line, section and field.
pub(super) fn problems(file: &ConfigFile) -> Vec<String> {
    let mut problems = Vec::new();
    for section in &file.sections {
        let at = |field: &Field, problem: String| {
            format!(
                "{}:{}: [{}] {}: {problem}",
                file.path.display(),
                field.line,
                section.kind,
                field.name
            )
        };
        if let Some((field, problem)) = identity_problem(section) {
            problems.push(at(field, problem));
        }
        for field in &section.fields {
            let Some(path) = field.values().first().map(|v| Path::new(*v)) else {
                continue;
            };
            let loaded = match field.name.as_str() {
                "policy" => hbone::policy::file::load(path)
                    .map(drop)
                    .map_err(|e| e.to_string()),
                "routes" => hbone::gateway::Routes::load(path)
                    .map(drop)
                    .map_err(|e| e.to_string()),
                "services" => hbone::services::ServiceTable::load(path)
                    .map(drop)
                    .map_err(|e| e.to_string()),
                "socks5-credentials" => hbone::entry::socks5::Credentials::load(path)
                    .map(drop)
                    .map_err(|e| e.to_string()),
                "crl" => hbone::revocation::Revocation::from_files(field.values())
                    .map(drop)
                    .map_err(|e| e.to_string()),
                _ => Ok(()),
            };
            if let Err(problem) = loaded {
                problems.push(at(field, problem));
            }
        }
    }
    problems
}

/// The identity of a section, loaded: the field to blame and why, if it
/// cannot be used.
fn identity_problem(section: &Section) -> Option<(&Field, String)> {
    let field = |name: &str| section.fields.iter().find(|f| f.name == name);
    let value = |f: &Field| f.values().first().map(|v| Path::new(*v).to_owned());
    let (blame, loaded, key) = if let Some(dir) = field("identity-dir") {
        let path = value(dir)?;
        let key = (dir, path.join(hbone::identity::KEY_FILE));
        (dir, hbone::Identity::from_dir(&path), key)
    } else {
        let (cert, key, bundle) = (field("cert")?, field("key")?, field("trust-bundle")?);
        (
            cert,
            hbone::Identity::from_files(&value(cert)?, &value(key)?, &value(bundle)?),
            (key, value(key)?),
        )
    };
    let allowed = field("allow-insecure-key-permissions").is_some_and(|f| !f.args.is_empty());
    if loaded.is_ok()
        && !allowed
        && let Err(e) = crate::cli::args::check_key_permissions(&key.1, false)
    {
        return Some((key.0, e.to_string().replace("start with --", "set ")));
    }
    match loaded {
        Err(e) => Some((blame, e.to_string())),
        Ok(identity) => match identity.expires_at() {
            Some(expires) if expires < std::time::SystemTime::now() => Some((
                blame,
                format!("the certificate of {} has expired", identity.id()),
            )),
            _ => None,
        },
    }
}
