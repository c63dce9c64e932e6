//! The endpoint classes (docs/rate-limits.md): every route belongs to one,
//! and each class has its own rate limit (`rate_limit.classes.NAME`). The one
//! list of them; a name that is not here is no class (never a default one).

/// An endpoint class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Session,
    Usage,
    Analytics,
    Profile,
    Credits,
    Admin,
}

impl Class {
    /// Every class, in the order the settings and metrics list them.
    pub const ALL: [Class; 6] = [
        Self::Session,
        Self::Usage,
        Self::Analytics,
        Self::Profile,
        Self::Credits,
        Self::Admin,
    ];

    /// The class of a name (`rate_limit.classes.NAME`, a user override
    /// `rl:NAME`); `None` for any other name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The name in settings, keys and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Usage => "usage",
            Self::Analytics => "analytics",
            Self::Profile => "profile",
            Self::Credits => "credits",
            Self::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class names, derived from [`Class::ALL`] (what
/// `settings::RATE_LIMIT_CLASSES` has always been).
pub const NAMES: [&str; Class::ALL.len()] = {
    let mut names = [""; Class::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = Class::ALL[i].as_str();
        i += 1;
    }
    names
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_reads_back_from_its_name() {
        for class in Class::ALL {
            assert_eq!(Class::parse(class.as_str()), Some(class));
            assert_eq!(class.to_string(), class.as_str());
        }
        assert_eq!(
            NAMES,
            [
                "session",
                "usage",
                "analytics",
                "profile",
                "credits",
                "admin"
            ]
        );
    }

    #[test]
    fn an_unknown_name_is_no_class_not_admin() {
        for name in ["", "nope", "Admin", "ADMIN", " admin", "credit", "sessions"] {
            assert_eq!(Class::parse(name), None, "{name:?}");
        }
    }
}
