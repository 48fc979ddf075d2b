//! Loading templates from disk: every `templates/<source>/<name>.{json,liquid}` with its source's partials, and the
//! live set that `serve` reloads template by template (a broken edit keeps the last good version).

use super::bounds::LoadLimits;
use super::{LoadError, PARTIALS_DIR, Template, dialect, document, valid_name, version_of};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

/// Every template under a directory, by (source, name), and the ones that did not load.
#[derive(Debug, Default)]
pub struct TemplateSet {
    by_name: HashMap<(String, String), Arc<Template>>,
    broken: HashMap<(String, String), LoadError>,
    /// Every problem of the load that made this set (a broken template, a partial, the directory), for the
    /// console's load status.
    problems: Vec<LoadError>,
}

/// A source's partials: `(name, text)` for each `_partials/<name>.liquid`, registered as `name` and
/// `name.liquid`, sorted by name.
fn read_partials(dir: &Path, errors: &mut Vec<LoadError>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in std::fs::read_dir(dir.join(PARTIALS_DIR)).into_iter().flatten().flatten() {
        let path = f.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        if !matches!(path.extension().and_then(|e| e.to_str()), Some("liquid" | "json")) {
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => match super::rewrite::rewrite(&text, true) {
                Ok(rewritten) => {
                    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    out.push((stem.to_owned(), rewritten.clone()));
                    out.push((file, rewritten));
                }
                Err((at, m)) => {
                    let (l, c) = document::line_col(&text, at);
                    errors.push(LoadError {
                        file: path.display().to_string(),
                        line: Some(l),
                        column: Some(c),
                        message: m,
                    });
                }
            },
            Err(e) => errors.push(LoadError {
                file: path.display().to_string(),
                line: None,
                column: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    out.sort();
    out
}

impl TemplateSet {
    /// Loads every template under `dir` under the default load limits.
    pub fn load_dir(dir: &Path) -> (Self, Vec<LoadError>) {
        Self::load_dir_with(dir, &LoadLimits::default())
    }

    /// Loads `dir/<source>/<name>.json` and `.liquid` for every source directory. Returns what loaded and every
    /// problem found; a template that failed is also listed in `broken`.
    pub fn load_dir_with(dir: &Path, limits: &LoadLimits) -> (Self, Vec<LoadError>) {
        let mut set = Self::default();
        let mut errors = Vec::new();
        let sources = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) => {
                errors.push(LoadError {
                    file: dir.display().to_string(),
                    line: None,
                    column: None,
                    message: format!("cannot read the templates directory: {e}"),
                });
                return (set, errors);
            }
        };
        let mut source_dirs: Vec<(String, PathBuf)> = sources
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .filter(|(s, _)| !s.starts_with('.'))
            .collect();
        source_dirs.sort();
        for (source, path) in source_dirs {
            set.load_source(&source, &path, limits, &mut errors);
        }
        set.problems = errors.clone();
        (set, errors)
    }

    fn load_source(&mut self, source: &str, dir: &Path, limits: &LoadLimits, errors: &mut Vec<LoadError>) {
        let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = f.path();
            if path.is_dir() || !matches!(path.extension().and_then(|e| e.to_str()), Some("json" | "liquid")) {
                continue;
            }
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            files.entry(name).or_default().push(path);
        }
        let mut partial_errors = Vec::new();
        let partials = read_partials(dir, &mut partial_errors);
        let parser = dialect::parser(&partials).map_err(|e| format!("the partials in {PARTIALS_DIR}/: {e}"));
        errors.extend(partial_errors.iter().cloned());
        for (name, mut paths) in files {
            paths.sort();
            let path = &paths[0];
            let shown = path.display().to_string();
            let key = (source.to_owned(), name.clone());
            let fail = |message: String| LoadError { file: shown.clone(), line: None, column: None, message };
            let result = if !valid_name(&name) {
                Err(fail(format!("template names may hold only letters, digits, `_` and `-`: {name:?}")))
            } else if paths.len() > 1 {
                Err(fail(format!("two templates are named {name:?} ({} files); keep one", paths.len())))
            } else if let Some(e) = partial_errors.first() {
                Err(fail(format!("a partial of this source does not load: {e}")))
            } else {
                match &parser {
                    Err(m) => Err(fail(document::one_line(m))),
                    Ok(parser) => read_template(path, limits).and_then(|text| {
                        let version = version_of(&text, &partials);
                        Template::compile_versioned(parser, source, &name, &shown, &text, limits, version)
                    }),
                }
            };
            match result {
                Ok(t) => {
                    self.by_name.insert(key, Arc::new(t));
                }
                Err(e) => {
                    errors.push(e.clone());
                    self.broken.insert(key, e);
                }
            }
        }
    }

    pub fn insert(&mut self, template: Template) {
        self.by_name.insert((template.source.clone(), template.name.clone()), Arc::new(template));
    }

    pub fn get(&self, source: &str, name: &str) -> Option<Arc<Template>> {
        self.by_name.get(&(source.to_owned(), name.to_owned())).cloned()
    }

    /// The load error of a template whose file exists but does not load.
    pub fn broken(&self, source: &str, name: &str) -> Option<&LoadError> {
        self.broken.get(&(source.to_owned(), name.to_owned()))
    }

    /// Every problem of the load that made this set, in the order found.
    pub fn problems(&self) -> &[LoadError] {
        &self.problems
    }

    /// The (source, name) of every template that loaded, sorted.
    pub fn names(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.by_name.keys().cloned().collect();
        v.sort();
        v
    }
}

fn read_template(path: &Path, limits: &LoadLimits) -> Result<String, LoadError> {
    let fail = |message: String| LoadError { file: path.display().to_string(), line: None, column: None, message };
    match std::fs::metadata(path) {
        Ok(m) if m.len() > limits.max_template_bytes => Err(fail(format!(
            "template is {} bytes; the limit is {} (templates.max_template_bytes)",
            m.len(),
            limits.max_template_bytes
        ))),
        _ => std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}"))),
    }
}

/// The live template set, reloaded from disk when a file changes.
#[derive(Debug)]
pub struct TemplateStore {
    dir: PathBuf,
    limits: LoadLimits,
    current: RwLock<Arc<TemplateSet>>,
    fingerprint: Mutex<Vec<(PathBuf, Option<SystemTime>, u64)>>,
}

impl TemplateStore {
    /// Loads `dir`, failing with every problem when any template does not load (for tools and tests that want
    /// all or nothing; `serve` uses `open_with`).
    pub fn load(dir: &Path) -> Result<Self, Vec<LoadError>> {
        Self::load_with(dir, LoadLimits::default())
    }

    /// As `load`, under `limits`; reloads use the same limits.
    pub fn load_with(dir: &Path, limits: LoadLimits) -> Result<Self, Vec<LoadError>> {
        match Self::open_with(dir, limits) {
            (store, errors) if errors.is_empty() => Ok(store),
            (_, errors) => Err(errors),
        }
    }

    /// Loads `dir` under `limits`. Templates that do not load are returned as problems and listed by `broken`;
    /// the others work. Reloads use the same limits.
    pub fn open_with(dir: &Path, limits: LoadLimits) -> (Self, Vec<LoadError>) {
        let (set, errors) = TemplateSet::load_dir_with(dir, &limits);
        let store = Self {
            dir: dir.to_owned(),
            limits,
            current: RwLock::new(Arc::new(set)),
            fingerprint: Mutex::new(fingerprint(dir)),
        };
        (store, errors)
    }

    pub fn from_set(dir: &Path, set: TemplateSet) -> Self {
        Self {
            dir: dir.to_owned(),
            limits: LoadLimits::default(),
            current: RwLock::new(Arc::new(set)),
            fingerprint: Mutex::new(fingerprint(dir)),
        }
    }

    /// The template to render with: the current file's, or the last good version of a file whose edit is broken.
    pub fn get(&self, source: &str, name: &str) -> Option<Arc<Template>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).get(source, name)
    }

    /// The load error of a template whose file exists but does not load (whether or not an older version is
    /// still in use).
    pub fn broken(&self, source: &str, name: &str) -> Option<LoadError> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).broken(source, name).cloned()
    }

    pub fn snapshot(&self) -> Arc<TemplateSet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reloads when any file under the directory changed, template by template: a template whose new text does
    /// not load keeps its last good version. Returns `Ok(true)` when everything loaded, `Err(problems)` when some
    /// template did not (the rest of the new set is installed all the same), `Ok(false)` when nothing changed.
    pub fn reload_if_changed(&self) -> Result<bool, Vec<LoadError>> {
        let now = fingerprint(&self.dir);
        let mut seen = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return Ok(false);
        }
        *seen = now;
        let (mut set, errors) = TemplateSet::load_dir_with(&self.dir, &self.limits);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        for key in set.broken.keys().cloned().collect::<Vec<_>>() {
            if let Some(good) = current.by_name.get(&key) {
                set.by_name.insert(key, good.clone());
            }
        }
        *current = Arc::new(set);
        if errors.is_empty() { Ok(true) } else { Err(errors) }
    }
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, Option<SystemTime>, u64)>) {
        for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = f.path();
            if let Ok(m) = f.metadata() {
                if m.is_dir() {
                    if depth < 2 {
                        walk(&path, depth + 1, out);
                    }
                } else {
                    out.push((path, m.modified().ok(), m.len()));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out);
    out.sort();
    out
}
