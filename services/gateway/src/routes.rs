//! The route table: which service serves a public path, and which calls
//! need no token.

use axum::http::Method;

/// Where a public request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The service name in discovery.
    pub service: &'static str,
    /// Whether the call may be made without a token.
    pub public: bool,
}

/// Matches a path below `/api/v1` (e.g. `/products/42`).
pub fn route(method: &Method, path: &str) -> Option<Route> {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let read = method == Method::GET || method == Method::HEAD;
    match first {
        "auth" => {
            let public = matches!(
                path,
                "/auth/register" | "/auth/login" | "/auth/refresh" | "/auth/.well-known/jwks.json"
            );
            Some(Route {
                service: "auth",
                public,
            })
        }
        "products" => {
            // Browsing is public; writes and buying need a token.
            let public = read && path != "/products/buy";
            Some(Route {
                service: "catalog",
                public,
            })
        }
        "orders" => Some(Route {
            service: "orders",
            public: false,
        }),
        // Stock levels are public; setting them is for admins.
        "inventory" => Some(Route {
            service: "inventory",
            public: read,
        }),
        "payments" => Some(Route {
            service: "payments",
            public: false,
        }),
        "notifications" => Some(Route {
            service: "notifications",
            public: false,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_policies() {
        let r = |m: Method, p: &str| route(&m, p);
        assert_eq!(
            r(Method::GET, "/products"),
            Some(Route {
                service: "catalog",
                public: true
            })
        );
        assert_eq!(
            r(Method::GET, "/products/abc"),
            Some(Route {
                service: "catalog",
                public: true
            })
        );
        assert_eq!(
            r(Method::POST, "/products"),
            Some(Route {
                service: "catalog",
                public: false
            })
        );
        assert_eq!(
            r(Method::POST, "/products/buy"),
            Some(Route {
                service: "catalog",
                public: false
            })
        );
        assert_eq!(
            r(Method::POST, "/auth/login"),
            Some(Route {
                service: "auth",
                public: true
            })
        );
        assert_eq!(
            r(Method::GET, "/auth/me"),
            Some(Route {
                service: "auth",
                public: false
            })
        );
        assert_eq!(
            r(Method::GET, "/orders/1"),
            Some(Route {
                service: "orders",
                public: false
            })
        );
        assert_eq!(r(Method::GET, "/productsx"), None);
        assert_eq!(r(Method::GET, "/admin"), None);
    }
}
