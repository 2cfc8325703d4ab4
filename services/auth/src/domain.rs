//! Validated registration input; past this module an email is well-formed
//! and lower-cased, a password long enough.

use bazaar_chassis::problem::{FieldError, Problem};
use serde::Deserialize;

/// The body of `POST /auth/register`, as sent: a password of 8 to 1024
/// characters, a name of 1 to 200.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(examples(json!({"email": "ada@example.com", "password": "correct horse", "name": "Ada"})))]
pub struct RegisterBody {
    #[schema(format = Email, max_length = 254)]
    pub email: String,
    #[schema(min_length = 8, max_length = 1024)]
    pub password: String,
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
}

/// A lower-cased, trimmed, plausible email address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let e = raw.trim().to_lowercase();
        let valid = e.len() <= 254
            && e.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty()
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && domain.contains('.')
                    && !domain.contains('@')
            })
            && !e.chars().any(|c| c.is_whitespace() || c.is_control());
        if valid {
            Ok(Self(e))
        } else {
            Err("not a valid email address".into())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Minimum password length (API.md).
pub const MIN_PASSWORD: usize = 8;

/// A registration that passed validation.
#[derive(Debug)]
pub struct NewUser {
    pub email: Email,
    pub password: String,
    pub name: String,
}

impl TryFrom<RegisterBody> for NewUser {
    type Error = Problem;

    fn try_from(b: RegisterBody) -> Result<Self, Problem> {
        let mut errors = Vec::new();
        let email = Email::parse(&b.email).map_err(|m| {
            errors.push(FieldError {
                field: "email".into(),
                message: m,
            })
        });
        let chars = b.password.chars().count();
        if chars < MIN_PASSWORD {
            errors.push(FieldError {
                field: "password".into(),
                message: format!("must be at least {MIN_PASSWORD} characters"),
            });
        } else if chars > 1024 {
            errors.push(FieldError {
                field: "password".into(),
                message: "must be at most 1024 characters".into(),
            });
        }
        let name = b.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 200 {
            errors.push(FieldError {
                field: "name".into(),
                message: "must be 1 to 200 characters".into(),
            });
        } else if name.chars().any(char::is_control) {
            errors.push(FieldError {
                field: "name".into(),
                message: "must not hold control characters".into(),
            });
        }
        match email {
            Ok(email) if errors.is_empty() => Ok(Self {
                email,
                password: b.password,
                name,
            }),
            _ => Err(Problem::validation(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            Email::parse(" Ann@Example.COM ").unwrap().as_str(),
            "ann@example.com"
        );
        for bad in [
            "",
            "ann",
            "ann@",
            "@x.com",
            "ann@x",
            "a b@x.com",
            "ann@.com",
            "ann@x.com.",
            "a@b@c.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn control_characters_in_emails_and_names_are_refused() {
        for c in ['\0', '\u{7}', '\u{1b}', '\u{7f}', '\u{85}'] {
            assert!(Email::parse(&format!("a{c}b@x.com")).is_err(), "{c:?}");
            let body = RegisterBody {
                email: "a@b.co".into(),
                password: "12345678".into(),
                name: format!("Ann{c}Lee"),
            };
            let p = NewUser::try_from(body).unwrap_err();
            assert_eq!(p.status, 422);
            assert_eq!(p.errors[0].field, "name");
        }
    }

    #[test]
    fn registration_rules() {
        let ok = RegisterBody {
            email: "a@b.co".into(),
            password: "12345678".into(),
            name: "Ann".into(),
        };
        assert!(NewUser::try_from(ok).is_ok());
        let bad = RegisterBody {
            email: "nope".into(),
            password: "short".into(),
            name: " ".into(),
        };
        let p = NewUser::try_from(bad).unwrap_err();
        assert_eq!(p.status, 422);
        assert_eq!(p.errors.len(), 3);
    }
}
