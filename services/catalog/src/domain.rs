//! Product input rules: a name, a positive price in minor units, an
//! ISO 4217 currency.

use bazaar_chassis::problem::{FieldError, Problem};
use serde::Deserialize;

/// The body of `POST`/`PUT /products`, as sent.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(examples(json!({"name": "Teapot", "description": "Holds 1.2 l", "price": 1299, "currency": "EUR"})))]
pub struct ProductBody {
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[serde(default)]
    #[schema(max_length = 5000)]
    pub description: String,
    /// In minor units of `currency`.
    #[schema(minimum = 1)]
    pub price: i64,
    /// ISO 4217; default USD.
    #[schema(pattern = "^[A-Za-z]{3}$")]
    pub currency: Option<String>,
    #[schema(max_length = 2000, pattern = "^https?://")]
    pub image_url: Option<String>,
}

/// A product definition that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductInput {
    pub name: String,
    pub description: String,
    pub price: i64,
    pub currency: String,
    pub image_url: Option<String>,
}

impl TryFrom<ProductBody> for ProductInput {
    type Error = Problem;

    fn try_from(b: ProductBody) -> Result<Self, Problem> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: &str| {
            errors.push(FieldError {
                field: field.into(),
                message: message.into(),
            })
        };
        let name = b.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 200 {
            bad("name", "must be 1 to 200 characters");
        }
        if b.description.chars().count() > 5000 {
            bad("description", "must be at most 5000 characters");
        }
        if b.price <= 0 {
            bad("price", "must be a positive integer amount in minor units");
        }
        let currency = b
            .currency
            .unwrap_or_else(|| "USD".into())
            .trim()
            .to_uppercase();
        if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
            bad("currency", "must be a 3-letter ISO 4217 code");
        }
        let image_url = b
            .image_url
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty());
        if image_url.as_ref().is_some_and(|u| {
            u.len() > 2000 || !(u.starts_with("http://") || u.starts_with("https://"))
        }) {
            bad("image_url", "must be an http(s) URL");
        }
        if errors.is_empty() {
            Ok(Self {
                name,
                description: b.description,
                price: b.price,
                currency,
                image_url,
            })
        } else {
            Err(Problem::validation(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(name: &str, price: i64, currency: Option<&str>) -> ProductBody {
        ProductBody {
            name: name.into(),
            description: String::new(),
            price,
            currency: currency.map(Into::into),
            image_url: None,
        }
    }

    #[test]
    fn valid_product_defaults_to_usd() {
        let p = ProductInput::try_from(body(" Mug ", 1299, None)).unwrap();
        assert_eq!((p.name.as_str(), p.currency.as_str()), ("Mug", "USD"));
    }

    #[test]
    fn rejects_bad_values() {
        for (name, price, cur) in [
            ("", 1, None),
            ("x", 0, None),
            ("x", -5, None),
            ("x", 1, Some("usdollar")),
        ] {
            let p = ProductInput::try_from(body(name, price, cur)).unwrap_err();
            assert_eq!(p.status, 422, "{name} {price} {cur:?}");
        }
    }
}
