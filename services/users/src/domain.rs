//! Profile changes as a client sends them, validated: past this module a
//! name, phone or address is within its limits and holds no control
//! characters.

use bazaar_chassis::problem::{FieldError, Problem};
use serde::{Deserialize, Deserializer};

/// Longest name, in characters.
pub const MAX_NAME: usize = 200;
/// Longest phone number, in characters.
pub const MAX_PHONE: usize = 32;
/// Longest address, in characters.
pub const MAX_ADDRESS: usize = 500;

/// `PATCH /users/me` as sent: an absent field stays; `null` clears a
/// phone or address.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"name": "Ada Lovelace", "phone": "+44 20 7946 0000", "address": null})))]
pub struct PatchBody {
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    /// Digits, spaces and `+ - ( ) .`; `null` clears it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 32, pattern = "^[0-9 +().-]*[0-9][0-9 +().-]*$")]
    pub phone: Option<Option<String>>,
    /// `null` clears it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 500)]
    pub address: Option<Option<String>>,
}

/// A field that was sent, `null` or not.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A checked change: `None` leaves a field as it is.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Change {
    pub name: Option<String>,
    pub phone: Option<Option<String>>,
    pub address: Option<Option<String>>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.name.is_none() && self.phone.is_none() && self.address.is_none()
    }
}

fn check(errors: &mut Vec<FieldError>, field: &str, value: &str, max: usize, lines: bool) {
    let n = value.chars().count();
    let message = if n == 0 || n > max {
        Some(format!("must be 1 to {max} characters"))
    } else if value
        .chars()
        .any(|c| c.is_control() && !(lines && c == '\n'))
    {
        Some("must not hold control characters".to_owned())
    } else {
        None
    };
    if let Some(message) = message {
        errors.push(FieldError {
            field: field.to_owned(),
            message,
        });
    }
}

/// A phone number: digits, spaces, `+ - ( ) .`, with at least one digit.
fn check_phone(errors: &mut Vec<FieldError>, phone: &str) {
    check(errors, "phone", phone, MAX_PHONE, false);
    let plausible = phone.chars().any(|c| c.is_ascii_digit())
        && phone
            .chars()
            .all(|c| c.is_ascii_digit() || " +-().".contains(c));
    if !plausible && !errors.iter().any(|e| e.field == "phone") {
        errors.push(FieldError {
            field: "phone".into(),
            message: "must be digits, spaces and + - ( ) .".into(),
        });
    }
}

impl TryFrom<PatchBody> for Change {
    type Error = Problem;

    fn try_from(b: PatchBody) -> Result<Self, Problem> {
        let mut errors = Vec::new();
        let name = b.name.map(|n| n.trim().to_owned());
        if let Some(name) = &name {
            check(&mut errors, "name", name, MAX_NAME, false);
        }
        let phone = b.phone.map(|p| p.map(|p| p.trim().to_owned()));
        if let Some(Some(phone)) = &phone {
            check_phone(&mut errors, phone);
        }
        let address = b.address.map(|a| a.map(|a| a.trim().to_owned()));
        if let Some(Some(address)) = &address {
            check(&mut errors, "address", address, MAX_ADDRESS, true);
        }
        if !errors.is_empty() {
            return Err(Problem::validation(errors));
        }
        let change = Self {
            name,
            phone,
            address,
        };
        if change.is_empty() {
            return Err(Problem::invalid(
                "body",
                "name, phone or address is required",
            ));
        }
        Ok(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(json: &str) -> Result<Change, u16> {
        let body: PatchBody = serde_json::from_str(json).map_err(|_| 400u16)?;
        Change::try_from(body).map_err(|p| p.status)
    }

    #[test]
    fn changes_are_checked() {
        assert_eq!(
            patch(r#"{"name":" Ann "}"#).map(|c| c.name),
            Ok(Some("Ann".into()))
        );
        assert_eq!(patch(r#"{"phone":null}"#).map(|c| c.phone), Ok(Some(None)));
        assert_eq!(
            patch(r#"{"address":"1 Road\nTown"}"#).map(|c| c.address),
            Ok(Some(Some("1 Road\nTown".into())))
        );
        assert_eq!(patch("{}"), Err(422));
        assert_eq!(patch(r#"{"name":""}"#), Err(422));
        assert_eq!(patch(r#"{"name":"a\u0007b"}"#), Err(422));
        assert_eq!(patch(r#"{"phone":"call me"}"#), Err(422));
        assert!(patch(r#"{"phone":"+1 (555) 010-9999"}"#).is_ok());
        assert_eq!(
            patch(&format!(r#"{{"address":"{}"}}"#, "x".repeat(501))),
            Err(422)
        );
        assert_eq!(
            patch(r#"{"role":"admin"}"#),
            Err(400),
            "unknown fields are refused"
        );
    }
}
