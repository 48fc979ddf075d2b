//! Signing in and out: a form for the token, then the session cookie (HttpOnly, SameSite=Strict, Secure over TLS,
//! expiring with the session). Failed attempts are counted per client address and throttled.

use super::session::{COOKIE, Sessions};
use super::views::{self, Nav};
use super::{ConsoleError, Viewer, check_origin, console_of, html, over_tls, see_other};
use crate::store::now_ms;
use actix_web::cookie::{Cookie, SameSite, time::Duration};
use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html as m};
use serde::Deserialize;

fn form_page(problem: Option<&str>) -> Markup {
    views::page(
        "Sign in",
        Nav::None,
        None,
        None,
        m! {
            form.signin method="post" action="/console/sign-in" {
                @if let Some(p) = problem { p.error role="alert" { (p) } }
                label { "Token (admin.token, or console.readonly_token to look only)"
                    input type="password" name="token" autocomplete="current-password" required autofocus; }
                button type="submit" { "Sign in" }
            }
        },
    )
}

pub async fn form(req: HttpRequest) -> Result<HttpResponse, ConsoleError> {
    console_of(&req)?;
    Ok(html(form_page(None)))
}

#[derive(Debug, Deserialize)]
pub struct SignIn {
    token: String,
}

pub async fn sign_in(req: HttpRequest, form: web::Form<SignIn>) -> Result<HttpResponse, ConsoleError> {
    let (_, console) = console_of(&req)?;
    check_origin(&req)?;
    let ip = crate::routes::client_ip(&req);
    let now = now_ms();
    if !console.throttle.allows(ip, now) {
        return Err(ConsoleError::Throttled);
    }
    let Some(role) = console.sessions.role_of(&form.token) else {
        console.throttle.failed(ip, now);
        tracing::warn!(client = ?ip, "console: sign-in with a wrong token");
        let mut r = html(form_page(Some("That token is not this relay's admin or read-only token.")));
        *r.status_mut() = actix_web::http::StatusCode::UNAUTHORIZED;
        return Ok(r);
    };
    let value = console.sessions.issue(role, now);
    let cookie = session_cookie(&req, value, Duration::seconds(console.sessions.lifetime_secs()));
    tracing::info!(client = ?ip, role = role.as_str(), "console: signed in");
    let mut r = see_other("/console");
    r.add_cookie(&cookie).map_err(|e| ConsoleError::Invalid(e.to_string()))?;
    Ok(r)
}

#[derive(Debug, Deserialize)]
pub struct Csrf {
    #[serde(default)]
    csrf: String,
}

pub async fn sign_out(req: HttpRequest, viewer: Viewer, form: web::Form<Csrf>) -> Result<HttpResponse, ConsoleError> {
    check_origin(&req)?;
    if !Sessions::csrf_ok(&viewer.session, &form.csrf) {
        return Err(ConsoleError::BadCsrf);
    }
    let mut r = see_other("/console/sign-in");
    r.add_cookie(&session_cookie(&req, String::new(), Duration::ZERO))
        .map_err(|e| ConsoleError::Invalid(e.to_string()))?;
    Ok(r)
}

fn session_cookie(req: &HttpRequest, value: String, max_age: Duration) -> Cookie<'static> {
    Cookie::build(COOKIE, value)
        .path("/console")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(over_tls(req))
        .max_age(max_age)
        .finish()
}
