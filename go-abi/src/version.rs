//! Go release versions as `.go.buildinfo` spells them (`go1.21.13`, `go1.22rc1`, `go1.27`).

use std::fmt;

/// A Go release. Pre-releases (`rc`, `beta`) sort before the release they precede.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    /// `rc1`, `beta2`, or extra text after the number (`X:nocoverageredesign`).
    pub suffix: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    #[error("not a Go release version: {text:?}")]
    Malformed { text: String },
}

impl GoVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        GoVersion { major, minor, patch, suffix: None }
    }

    /// Parses `go1.21.13`, `1.21.13`, `go1.22rc1`, `go1.23.0 X:boringcrypto`.
    pub fn parse(text: &str) -> Result<Self, VersionError> {
        let err = || VersionError::Malformed { text: text.to_string() };
        let t = text.trim();
        let t = t.strip_prefix("devel ").unwrap_or(t);
        let t = t.strip_prefix("go").unwrap_or(t);
        let (num, rest) = split_numeric(t);
        let mut parts = num.split('.');
        let mut next = |required: bool| -> Result<u32, VersionError> {
            match parts.next() {
                Some(p) if !p.is_empty() => p.parse().map_err(|_| err()),
                Some(_) => Err(err()),
                None if required => Err(err()),
                None => Ok(0),
            }
        };
        let major = next(true)?;
        let minor = next(true)?;
        let patch = next(false)?;
        if parts.next().is_some() {
            return Err(err());
        }
        let suffix = rest.trim();
        Ok(GoVersion { major, minor, patch, suffix: (!suffix.is_empty()).then(|| suffix.to_string()) })
    }

    /// The `major.minor` release line, e.g. (1, 21).
    pub fn release(&self) -> (u32, u32) {
        (self.major, self.minor)
    }

    fn is_prerelease(&self) -> bool {
        self.suffix.as_deref().is_some_and(|s| s.starts_with("rc") || s.starts_with("beta"))
    }
}

fn split_numeric(t: &str) -> (&str, &str) {
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    (&t[..end], &t[end..])
}

impl PartialOrd for GoVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for GoVersion {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.major, self.minor, self.patch, !self.is_prerelease()).cmp(&(
            other.major,
            other.minor,
            other.patch,
            !other.is_prerelease(),
        ))
    }
}

impl fmt::Display for GoVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "go{}.{}", self.major, self.minor)?;
        if self.patch != 0 || self.suffix.is_none() {
            write!(f, ".{}", self.patch)?;
        }
        if let Some(s) = &self.suffix {
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_and_prerelease() {
        assert_eq!(GoVersion::parse("go1.21.13").unwrap(), GoVersion::new(1, 21, 13));
        assert_eq!(GoVersion::parse("1.27").unwrap(), GoVersion::new(1, 27, 0));
        let rc = GoVersion::parse("go1.22rc1").unwrap();
        assert_eq!(rc.suffix.as_deref(), Some("rc1"));
        assert!(rc < GoVersion::new(1, 22, 0));
        assert!(GoVersion::new(1, 21, 13) < GoVersion::new(1, 22, 0));
        let boring = GoVersion::parse("go1.23.1 X:boringcrypto").unwrap();
        assert_eq!(boring.release(), (1, 23));
        assert!(!boring.is_prerelease());
    }

    #[test]
    fn rejects_garbage() {
        let dev = GoVersion::parse("devel go1.27-4a5b6c Mon Oct 6 2026").unwrap();
        assert_eq!(dev.release(), (1, 27));
        for bad in ["", "go", "devel +abc", "go1", "go1..2", "go1.2.3.4", "gox.y"] {
            assert!(GoVersion::parse(bad).is_err(), "{bad}");
        }
    }
}
