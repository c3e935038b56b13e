//! Organizations (tenants): teams with members, invitations and a tenant
//! admin; tokens that act for one organization with its tier; one limit
//! budget per team at the gateway; isolation between two organizations
//! and a personal account, route by route. On SQLite and PostgreSQL.

use std::net::SocketAddr;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{client, gateway, json_of, upstream};
use crate::platform::{
    as_service, as_user, both_databases, eventually, post, Database, Inbox, Running, World,
};
use crate::users::{
    claims_of as claims, settings as users_settings, signed_up, token_of, PASSWORD,
};

/// A signed-up user: id, e-mail and the login's token pair.
#[derive(Clone)]
pub struct Person {
    pub id: String,
    pub email: String,
    pub access: String,
    pub refresh: String,
}

impl Person {
    fn update(&mut self, pair: &Value) {
        self.access = pair["access_token"].as_str().unwrap().to_owned();
        self.refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    }
}

pub async fn person(base: &str, inbox: &Inbox, email: &str) -> Person {
    let pair = signed_up(base, inbox, email).await;
    let access = pair["access_token"].as_str().unwrap().to_owned();
    Person {
        id: claims(&access)["sub"].as_str().unwrap().to_owned(),
        email: email.to_owned(),
        access,
        refresh: pair["refresh_token"].as_str().unwrap().to_owned(),
    }
}

async fn call(
    base: &str,
    who: &Person,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    as_user(method, base, path, &who.access, body).await
}

/// Creates an organization as `owner`; its id.
pub async fn org(base: &str, owner: &Person, name: &str) -> String {
    let (status, body) = call(
        base,
        owner,
        Method::POST,
        "/api/orgs",
        Some(json!({"name": name})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Invites `who` into `org` as `role` (by `by`) and accepts as `who`.
pub async fn join(base: &str, inbox: &Inbox, org: &str, by: &Person, who: &Person, role: &str) {
    let (status, body) = call(
        base,
        by,
        Method::POST,
        &format!("/api/orgs/{org}/invitations"),
        Some(json!({"email": who.email, "role": role})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let event = inbox
        .wait_for("organization.invitation_created", "email", &who.email)
        .await;
    let token = token_of(&event["data"]["accept_url"]);
    let (status, body) = call(
        base,
        who,
        Method::POST,
        "/api/orgs/invitations/accept",
        Some(json!({"token": token})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["role"], role);
}

/// Switches `who`'s login to `tenant` (or personal) and keeps the new pair.
pub async fn switch(base: &str, who: &mut Person, tenant: Option<&str>) -> Value {
    let (status, pair) = post(
        base,
        "/api/auth/switch",
        json!({"refresh_token": who.refresh, "tenant": tenant}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{pair}");
    who.update(&pair);
    claims(&who.access)
}

async fn refresh(base: &str, who: &mut Person) -> StatusCode {
    let (status, pair) = post(
        base,
        "/api/auth/refresh",
        json!({"refresh_token": who.refresh}),
    )
    .await;
    if status == StatusCode::OK {
        who.update(&pair);
    }
    status
}

/// Two organizations and a personal account:
/// Acme (alice owner, bob admin, carol member), Beta (dave owner), erin.
struct Teams {
    world: World,
    inbox: Inbox,
    users: Running,
    alice: Person,
    bob: Person,
    carol: Person,
    dave: Person,
    erin: Person,
    acme: String,
    beta: String,
}

async fn teams(db: Database) -> Teams {
    let world = World::new(db);
    let inbox = Inbox::start().await;
    let users = world.start::<users::UsersService>(
        users_settings(&world, inbox.subscribers("notifications")).await,
    );
    let base = users.base.clone();
    let alice = person(&base, &inbox, "alice@acme.test").await;
    let bob = person(&base, &inbox, "bob@acme.test").await;
    let carol = person(&base, &inbox, "carol@acme.test").await;
    let dave = person(&base, &inbox, "dave@beta.test").await;
    let erin = person(&base, &inbox, "erin@home.test").await;
    let acme = org(&base, &alice, "Acme Indonesia").await;
    let beta = org(&base, &dave, "Beta").await;
    join(&base, &inbox, &acme, &alice, &bob, "admin").await;
    join(&base, &inbox, &acme, &bob, &carol, "member").await;
    Teams {
        world,
        inbox,
        users,
        alice,
        bob,
        carol,
        dave,
        erin,
        acme,
        beta,
    }
}

both_databases! {
    /// Every organization route, as every kind of caller: no read or write
    /// across organizations; a guessed id answers 404 like a missing one;
    /// members read, tenant admins change, owners own.
    async fn test_no_route_crosses_an_organization(db: Database) {
        let t = teams(db).await;
        let base = t.users.base.clone();
        let inv = {
            let (status, body) = call(&base, &t.alice, Method::POST, &format!("/api/orgs/{}/invitations", t.acme),
                Some(json!({"email": "frank@else.test"}))).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body["id"].as_str().unwrap().to_owned()
        };
        let guessed = uuid::Uuid::now_v7().to_string();
        let (acme, beta) = (t.acme.as_str(), t.beta.as_str());
        let (carol_id, dave_id, alice_id) = (t.carol.id.as_str(), t.dave.id.as_str(), t.alice.id.as_str());
        let patch = json!({"name": "Renamed"});
        let role = json!({"role": "admin"});
        let invite = json!({"email": "x@y.test"});
        let to = |id: &str| json!({"user_id": id});
        // (who, method, path, body, expected status)
        let table: Vec<(&Person, Method, String, Option<Value>, u16)> = vec![
            // Reading an organization.
            (&t.alice, Method::GET, format!("/api/orgs/{acme}"), None, 200),
            (&t.carol, Method::GET, format!("/api/orgs/{acme}"), None, 200),
            (&t.dave, Method::GET, format!("/api/orgs/{acme}"), None, 404),
            (&t.erin, Method::GET, format!("/api/orgs/{acme}"), None, 404),
            (&t.alice, Method::GET, format!("/api/orgs/{beta}"), None, 404),
            (&t.alice, Method::GET, format!("/api/orgs/{guessed}"), None, 404),
            (&t.carol, Method::GET, format!("/api/orgs/{acme}/members"), None, 200),
            (&t.dave, Method::GET, format!("/api/orgs/{acme}/members"), None, 404),
            (&t.erin, Method::GET, format!("/api/orgs/{beta}/members"), None, 404),
            // Changing it: tenant admins only, and only their own.
            (&t.carol, Method::PATCH, format!("/api/orgs/{acme}"), Some(patch.clone()), 403),
            (&t.dave, Method::PATCH, format!("/api/orgs/{acme}"), Some(patch.clone()), 404),
            (&t.erin, Method::PATCH, format!("/api/orgs/{acme}"), Some(patch.clone()), 404),
            (&t.alice, Method::PATCH, format!("/api/orgs/{beta}"), Some(patch.clone()), 404),
            (&t.bob, Method::DELETE, format!("/api/orgs/{acme}"), None, 403),
            (&t.dave, Method::DELETE, format!("/api/orgs/{acme}"), None, 404),
            // Members.
            (&t.carol, Method::PATCH, format!("/api/orgs/{acme}/members/{carol_id}"), Some(role.clone()), 403),
            (&t.dave, Method::PATCH, format!("/api/orgs/{acme}/members/{carol_id}"), Some(role.clone()), 404),
            (&t.alice, Method::PATCH, format!("/api/orgs/{acme}/members/{dave_id}"), Some(role.clone()), 404),
            (&t.alice, Method::PATCH, format!("/api/orgs/{beta}/members/{dave_id}"), Some(role.clone()), 404),
            (&t.bob, Method::PATCH, format!("/api/orgs/{acme}/members/{alice_id}"), Some(json!({"role": "member"})), 403),
            (&t.dave, Method::DELETE, format!("/api/orgs/{acme}/members/{carol_id}"), None, 404),
            (&t.carol, Method::DELETE, format!("/api/orgs/{acme}/members/{alice_id}"), None, 403),
            (&t.alice, Method::DELETE, format!("/api/orgs/{beta}/members/{dave_id}"), None, 404),
            (&t.alice, Method::DELETE, format!("/api/orgs/{acme}/members/{guessed}"), None, 404),
            (&t.erin, Method::POST, format!("/api/orgs/{beta}/leave"), None, 404),
            (&t.alice, Method::POST, format!("/api/orgs/{beta}/transfer"), Some(to(alice_id)), 404),
            (&t.bob, Method::POST, format!("/api/orgs/{acme}/transfer"), Some(to(carol_id)), 403),
            (&t.alice, Method::POST, format!("/api/orgs/{acme}/transfer"), Some(to(dave_id)), 404),
            // Invitations.
            (&t.carol, Method::POST, format!("/api/orgs/{acme}/invitations"), Some(invite.clone()), 403),
            (&t.dave, Method::POST, format!("/api/orgs/{acme}/invitations"), Some(invite.clone()), 404),
            (&t.erin, Method::POST, format!("/api/orgs/{acme}/invitations"), Some(invite.clone()), 404),
            (&t.carol, Method::GET, format!("/api/orgs/{acme}/invitations"), None, 403),
            (&t.dave, Method::GET, format!("/api/orgs/{acme}/invitations"), None, 404),
            (&t.dave, Method::DELETE, format!("/api/orgs/{acme}/invitations/{inv}"), None, 404),
            (&t.dave, Method::DELETE, format!("/api/orgs/{beta}/invitations/{inv}"), None, 404),
            (&t.carol, Method::DELETE, format!("/api/orgs/{acme}/invitations/{inv}"), None, 403),
            (&t.bob, Method::GET, format!("/api/orgs/{acme}/invitations"), None, 200),
            // Other services' route: not for a user's token.
            (&t.alice, Method::GET, format!("/internal/organizations/{acme}"), None, 401),
        ];
        for (who, method, path, body, want) in table {
            let (status, answer) = call(&base, who, method.clone(), &path, body.clone()).await;
            assert_eq!(status.as_u16(), want, "{} {method} {path}: {answer}", who.email);
            if want == 404 {
                assert!(!answer.to_string().contains("Acme") && !answer.to_string().contains("Beta"), "a 404 says nothing: {answer}");
            }
        }
        // The lists show only the caller's own.
        let (_, list) = call(&base, &t.alice, Method::GET, "/api/orgs", None).await;
        let names: Vec<&str> = list.as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["Acme Indonesia"]);
        let (_, list) = call(&base, &t.erin, Method::GET, "/api/orgs", None).await;
        assert_eq!(list, json!([]));
        // A login cannot act for an organization its user is not in.
        let mut alice = t.alice.clone();
        let (status, body) = post(&base, "/api/auth/switch", json!({"refresh_token": alice.refresh, "tenant": beta})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
        // Nothing above changed Acme.
        let (_, acme_now) = call(&base, &alice, Method::GET, &format!("/api/orgs/{acme}"), None).await;
        assert_eq!(acme_now["name"], "Acme Indonesia");
        let (_, members) = call(&base, &alice, Method::GET, &format!("/api/orgs/{acme}/members"), None).await;
        let roles: Vec<(&str, &str)> = members.as_array().unwrap().iter()
            .map(|m| (m["email"].as_str().unwrap(), m["role"].as_str().unwrap())).collect();
        assert_eq!(roles, [("alice@acme.test", "owner"), ("bob@acme.test", "admin"), ("carol@acme.test", "member")]);
        // The earlier refused switch rotated nothing: alice's login works.
        assert_eq!(refresh(&base, &mut alice).await, StatusCode::OK);
        t.users.stop().await;
    }
}

both_databases! {
    /// Creating and changing an organization: every field checked, NPWP
    /// normalised, slugs unique, company details for other services.
    async fn test_organization_details_and_company_data(db: Database) {
        let t = teams(db).await;
        let base = t.users.base.clone();
        let (status, body) = call(&base, &t.erin, Method::POST, "/api/orgs", Some(json!({
            "name": "", "slug": "-bad-", "company": {"npwp": "12", "nitku": "x"}}))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let fields: Vec<&str> = body["error"]["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
        assert!(fields.contains(&"slug"), "{body}");
        let (status, body) = call(&base, &t.erin, Method::POST, "/api/orgs", Some(json!({
            "name": "Toko Erin", "company": {"npwp": "12", "nitku": "x"}}))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let fields: Vec<&str> = body["error"]["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
        assert_eq!(fields, ["company.npwp", "company.nitku"], "{body}");
        let (status, body) = call(&base, &t.erin, Method::POST, "/api/orgs", Some(json!({"name": "x", "colour": "red"}))).await;
        assert_eq!((status, body["error"]["fields"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("colour")));
        // A taken explicit slug is 409; a derived one gets a suffix.
        let (status, body) = call(&base, &t.erin, Method::POST, "/api/orgs", Some(json!({"name": "Acme", "slug": "acme-indonesia"}))).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("slug_taken")));
        let (status, body) = call(&base, &t.erin, Method::POST, "/api/orgs", Some(json!({"name": "Acme Indonesia"}))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let slug = body["slug"].as_str().unwrap();
        assert!(slug.starts_with("acme-indonesia-") && slug.len() == "acme-indonesia-".len() + 4, "{slug}");
        assert_eq!((body["role"].as_str(), body["tier"].as_str()), (Some("owner"), Some("FREE")));
        // Company details: the 15-digit NPWP gets its leading 0.
        let (status, body) = call(&base, &t.bob, Method::PATCH, &format!("/api/orgs/{}", t.acme), Some(json!({
            "company": {"legal_name": "PT Acme Indonesia", "npwp": "01.234.567.8-901.000",
                        "nitku": "0012345678901000000000", "address": "Jl. Sudirman 1, Jakarta"}}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["company"]["npwp"], "0012345678901000");
        assert_eq!(body["name"], "Acme Indonesia");
        let (status, body) = call(&base, &t.bob, Method::PATCH, &format!("/api/orgs/{}", t.acme), Some(json!({"slug": "new"}))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let (status, body) = call(&base, &t.bob, Method::PATCH, &format!("/api/orgs/{}", t.acme), Some(json!({
            "company": {"nitku": "3171012345678901000000"}}))).await;
        assert_eq!((status, body["error"]["fields"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("company.nitku")));
        // Billing reads it with its own service token.
        let (status, org) = as_service(&t.world.keys_of("billing"), Method::GET, ("users", &t.users), &format!("/internal/organizations/{}", t.acme), None).await;
        assert_eq!(status, StatusCode::OK, "{org}");
        assert_eq!(org["company"]["legal_name"], "PT Acme Indonesia");
        let admins: Vec<&str> = org["admins"].as_array().unwrap().iter().map(|a| a["email"].as_str().unwrap()).collect();
        assert_eq!(admins, ["alice@acme.test", "bob@acme.test"]);
        let (status, _) = as_service(&t.world.keys_of("gateway"), Method::GET, ("users", &t.users), &format!("/internal/organizations/{}", t.acme), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "the gateway does not read organizations");
        let (status, _) = as_service(&t.world.keys_of("billing"), Method::GET, ("users", &t.users), "/internal/organizations/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        t.users.stop().await;
    }
}

both_databases! {
    /// Invitations: single use, for the invited address, expiring,
    /// replaced by a new one, revocable, declinable without an account.
    async fn test_invitations(db: Database) {
        let t = teams(db).await;
        let base = t.users.base.clone();
        let invite = |email: &str, role: &str| {
            let (base, bob, acme) = (base.clone(), t.bob.clone(), t.acme.clone());
            let body = json!({"email": email, "role": role});
            async move { call(&base, &bob, Method::POST, &format!("/api/orgs/{acme}/invitations"), Some(body)).await }
        };
        let (status, body) = invite("erin@home.test", "owner").await;
        assert_eq!((status, body["error"]["fields"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("role")));
        let (status, body) = invite("Carol@Acme.test", "member").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("already_member")));
        // Two invitations of one address: the second replaces the first.
        invite("erin@home.test", "member").await;
        let first = t.inbox.wait_for("organization.invitation_created", "email", "erin@home.test").await;
        assert_eq!(first["data"]["organization"], "Acme Indonesia");
        assert_eq!(first["data"]["subject"], json!({"kind": "organization", "id": t.acme}));
        t.world.clock.advance(std::time::Duration::from_millis(5));
        invite("erin@home.test", "member").await;
        let second = eventually("the second invitation", || async {
            t.inbox.events().into_iter().rfind(|e| e["type"] == "organization.invitation_created"
                && e["data"]["email"] == "erin@home.test" && e["id"] != first["id"])
        }).await;
        let (old, new) = (token_of(&first["data"]["accept_url"]), token_of(&second["data"]["accept_url"]));
        let (status, body) = post(&base, "/api/orgs/invitations/preview", json!({"token": old})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_invitation")));
        let (status, preview) = post(&base, "/api/orgs/invitations/preview", json!({"token": new})).await;
        assert_eq!(status, StatusCode::OK, "{preview}");
        assert_eq!((preview["organization"].as_str(), preview["role"].as_str(), preview["invited_by"].as_str()),
            (Some("Acme Indonesia"), Some("member"), Some("Ann")));
        let (_, pending) = call(&base, &t.alice, Method::GET, &format!("/api/orgs/{}/invitations", t.acme), None).await;
        assert_eq!(pending.as_array().unwrap().len(), 1, "{pending}");
        // Only the invited address accepts; once.
        let (status, body) = call(&base, &t.dave, Method::POST, "/api/orgs/invitations/accept", Some(json!({"token": new}))).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("invitation_for_another_address")));
        let (status, body) = call(&base, &t.erin, Method::POST, "/api/orgs/invitations/accept", Some(json!({"token": new}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!((body["id"].as_str(), body["role"].as_str()), (Some(t.acme.as_str()), Some("member")));
        let (status, _) = call(&base, &t.erin, Method::POST, "/api/orgs/invitations/accept", Some(json!({"token": new}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "single use");
        t.inbox.wait_for("organization.member_added", "user_id", &t.erin.id).await;
        // Declined without an account; revoked; expired.
        invite("frank@else.test", "member").await;
        let f = t.inbox.wait_for("organization.invitation_created", "email", "frank@else.test").await;
        let (status, _) = post(&base, "/api/orgs/invitations/decline", json!({"token": token_of(&f["data"]["accept_url"])})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = post(&base, "/api/orgs/invitations/decline", json!({"token": token_of(&f["data"]["accept_url"])})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, inv) = invite("gina@else.test", "admin").await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, _) = call(&base, &t.alice, Method::DELETE, &format!("/api/orgs/{}/invitations/{}", t.acme, inv["id"].as_str().unwrap()), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let g = t.inbox.wait_for("organization.invitation_created", "email", "gina@else.test").await;
        let (status, _) = post(&base, "/api/orgs/invitations/preview", json!({"token": token_of(&g["data"]["accept_url"])})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "revoked");
        invite("hana@else.test", "member").await;
        let h = t.inbox.wait_for("organization.invitation_created", "email", "hana@else.test").await;
        t.world.clock.advance(std::time::Duration::from_secs(7 * 86_400 + 1));
        let (status, _) = post(&base, "/api/orgs/invitations/preview", json!({"token": token_of(&h["data"]["accept_url"])})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "expired after 7 days");
        let (status, _) = post(&base, "/api/orgs/invitations/preview", json!({"token": "forged"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        t.users.stop().await;
    }
}

both_databases! {
    /// Changes to one organization are decided under its lock: two owners
    /// demoting each other at once leave exactly one owner; an invitation
    /// dies with its sender's admin rights; removal ends a family whole.
    async fn test_concurrent_changes_and_invitations_follow_the_inviter(db: Database) {
        let t = teams(db).await;
        let base = t.users.base.clone();
        let path = |who: &Person| format!("/api/orgs/{}/members/{}", t.acme, who.id);
        let (status, _) = call(&base, &t.alice, Method::PATCH, &path(&t.bob), Some(json!({"role": "owner"}))).await;
        assert_eq!(status, StatusCode::OK);
        for _ in 0..5 {
            let demote = json!({"role": "admin"});
            let (to_bob, to_alice) = (path(&t.bob), path(&t.alice));
            let (a, b) = tokio::join!(
                call(&base, &t.alice, Method::PATCH, &to_bob, Some(demote.clone())),
                call(&base, &t.bob, Method::PATCH, &to_alice, Some(demote.clone())),
            );
            // The second, decided after the first committed, is either
            // the last owner's (409) or no longer an owner's (403).
            let mut codes = [a.0.as_u16(), b.0.as_u16()];
            codes.sort_unstable();
            assert!(codes == [200, 403] || codes == [200, 409], "{} / {}", a.1, b.1);
            let (_, members) = call(&base, &t.carol, Method::GET, &format!("/api/orgs/{}/members", t.acme), None).await;
            let owners: Vec<_> = members.as_array().unwrap().iter().filter(|m| m["role"] == "owner").collect();
            assert_eq!(owners.len(), 1, "{members}");
            // Make both owners again for the next round.
            let (owner, other) = if a.0 == StatusCode::OK { (&t.alice, &t.bob) } else { (&t.bob, &t.alice) };
            let (status, _) = call(&base, owner, Method::PATCH, &path(other), Some(json!({"role": "owner"}))).await;
            assert_eq!(status, StatusCode::OK);
        }
        // Bob (an owner) invites erin, then is made a plain member: the
        // invitation is revoked; and one sent by an admin who is then
        // removed is refused at acceptance too.
        let (status, _) = call(&base, &t.alice, Method::PATCH, &path(&t.bob), Some(json!({"role": "admin"}))).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = call(&base, &t.bob, Method::POST, &format!("/api/orgs/{}/invitations", t.acme),
            Some(json!({"email": t.erin.email, "role": "member"}))).await;
        assert_eq!(status, StatusCode::CREATED);
        let sent = t.inbox.wait_for("organization.invitation_created", "email", &t.erin.email).await;
        let (status, _) = call(&base, &t.alice, Method::PATCH, &path(&t.bob), Some(json!({"role": "member"}))).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = call(&base, &t.erin, Method::POST, "/api/orgs/invitations/accept",
            Some(json!({"token": token_of(&sent["data"]["accept_url"])}))).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_invitation")));
        let (_, pending) = call(&base, &t.alice, Method::GET, &format!("/api/orgs/{}/invitations", t.acme), None).await;
        assert_eq!(pending, json!([]));
        // Removal revokes the family whole: an older token of it is refused
        // as well, not just the current one.
        let mut carol = t.carol.clone();
        switch(&base, &mut carol, Some(&t.acme)).await;
        let older = carol.clone();
        assert_eq!(refresh(&base, &mut carol).await, StatusCode::OK);
        let (status, _) = call(&base, &t.alice, Method::DELETE, &path(&carol), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(refresh(&base, &mut carol).await, StatusCode::UNAUTHORIZED);
        assert_eq!(refresh(&base, &mut older.clone()).await, StatusCode::UNAUTHORIZED);
        t.users.stop().await;
    }
}

both_databases! {
    /// A login acts for one organization at a time: its claims and tier;
    /// refresh keeps it; roles follow the membership at the next token;
    /// removal ends the organization's sessions at once; subscription
    /// events set an organization's tier; the last owner stays.
    async fn test_switching_roles_tiers_and_leaving(db: Database) {
        let t = teams(db).await;
        let base = t.users.base.clone();
        let (mut bob, mut carol) = (t.bob.clone(), t.carol.clone());
        let c = switch(&base, &mut bob, Some(&t.acme)).await;
        assert_eq!((c["tenant"].as_str(), c["tenant_role"].as_str(), c["tier"].as_str()),
            (Some(t.acme.as_str()), Some("admin"), Some("FREE")));
        assert_eq!(c["roles"], json!(["user", "tenant_admin"]));
        let c = switch(&base, &mut carol, Some(&t.acme)).await;
        assert_eq!((c["tenant_role"].as_str(), c["roles"].clone()), (Some("member"), json!(["user"])));
        // The organization subscribes: its members' tokens carry its tier,
        // their personal ones keep theirs.
        let subscriptions = t.world.keys_of("subscriptions");
        let event = json!({"id": "evt-org-1", "type": "subscription.activated", "source": "subscriptions",
            "occurred_at": t.world.clock.now_ms(),
            "data": {"user_id": t.alice.id, "subject": {"kind": "organization", "id": t.acme}, "tier": "ENTERPRISE"}});
        let (status, body) = as_service(&subscriptions, Method::POST, ("users", &t.users), "/internal/events", Some(event)).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("applied")), "{body}");
        assert_eq!(refresh(&base, &mut bob).await, StatusCode::OK);
        assert_eq!(claims(&bob.access)["tier"], "ENTERPRISE");
        assert_eq!(claims(&bob.access)["tenant"], t.acme.as_str(), "refresh keeps the tenant");
        let (_, acme) = call(&base, &bob, Method::GET, &format!("/api/orgs/{}", t.acme), None).await;
        assert_eq!(acme["tier"], "ENTERPRISE");
        let c = switch(&base, &mut bob, None).await;
        assert!(c["tenant"].is_null());
        assert_eq!((c["tier"].as_str(), c["roles"].clone()), (Some("FREE"), json!(["user"])));
        let nobody = json!({"id": "evt-org-2", "type": "subscription.activated", "source": "subscriptions",
            "occurred_at": t.world.clock.now_ms(),
            "data": {"user_id": t.alice.id, "subject": {"kind": "organization", "id": "no-such-org"}, "tier": "BASIC"}});
        let (_, body) = as_service(&subscriptions, Method::POST, ("users", &t.users), "/internal/events", Some(nobody)).await;
        assert_eq!((body["status"].as_str(), body["reason"].as_str()), (Some("rejected"), Some("unknown_subject")));
        // Demoted mid-session: the next token has no tenant_admin.
        switch(&base, &mut bob, Some(&t.acme)).await;
        let (status, _) = call(&base, &t.alice, Method::PATCH, &format!("/api/orgs/{}/members/{}", t.acme, bob.id), Some(json!({"role": "member"}))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(refresh(&base, &mut bob).await, StatusCode::OK);
        assert_eq!(claims(&bob.access)["roles"], json!(["user"]));
        assert_eq!(claims(&bob.access)["tenant_role"], "member");
        let (status, _) = call(&base, &bob, Method::GET, &format!("/api/orgs/{}/invitations", t.acme), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // Removal ends the sessions acting for the organization, not the
        // person's others.
        let mut carol_personal = {
            let (_, pair) = post(&base, "/api/auth/login", json!({"email": carol.email, "password": PASSWORD})).await;
            let mut p = carol.clone();
            p.update(&pair);
            p
        };
        let (status, _) = call(&base, &t.alice, Method::DELETE, &format!("/api/orgs/{}/members/{}", t.acme, carol.id), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(refresh(&base, &mut carol).await, StatusCode::UNAUTHORIZED, "the tenant session ended");
        assert_eq!(refresh(&base, &mut carol_personal).await, StatusCode::OK);
        let (status, _) = call(&base, &carol_personal, Method::GET, &format!("/api/orgs/{}", t.acme), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        t.inbox.wait_for("organization.member_removed", "member_id", &carol.id).await;
        // The last owner cannot leave or be demoted; after a transfer they can.
        let (status, body) = call(&base, &t.alice, Method::POST, &format!("/api/orgs/{}/leave", t.acme), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("last_owner")));
        let (status, body) = call(&base, &t.alice, Method::PATCH, &format!("/api/orgs/{}/members/{}", t.acme, t.alice.id), Some(json!({"role": "admin"}))).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("last_owner")));
        let (status, members) = call(&base, &t.alice, Method::POST, &format!("/api/orgs/{}/transfer", t.acme), Some(json!({"user_id": bob.id}))).await;
        assert_eq!(status, StatusCode::OK, "{members}");
        assert_eq!(members[0]["email"], "bob@acme.test");
        assert_eq!(members[0]["role"], "owner");
        let (status, _) = call(&base, &t.alice, Method::POST, &format!("/api/orgs/{}/leave", t.acme), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        // Dissolving: not while the subscription is paid.
        let (status, body) = call(&base, &bob, Method::DELETE, &format!("/api/orgs/{}", t.acme), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("subscription_active")));
        let ended = json!({"id": "evt-org-3", "type": "subscription.ended", "source": "subscriptions",
            "occurred_at": t.world.clock.now_ms() + 1,
            "data": {"user_id": bob.id, "subject": {"kind": "organization", "id": t.acme}}});
        let (_, body) = as_service(&subscriptions, Method::POST, ("users", &t.users), "/internal/events", Some(ended)).await;
        assert_eq!(body["status"], "applied", "{body}");
        let (status, _) = call(&base, &bob, Method::DELETE, &format!("/api/orgs/{}", t.acme), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(refresh(&base, &mut bob).await, StatusCode::UNAUTHORIZED, "its sessions ended");
        t.inbox.wait_for("organization.dissolved", "org_id", &t.acme).await;
        t.users.stop().await;
    }
}

both_databases! {
    /// At the gateway: an ENTERPRISE organization's members draw from one
    /// budget (`limit_by: tenant`), the 429 says so, tokens without a
    /// tenant keep their own; `roles: [tenant_admin]` routes; the tenant
    /// goes upstream in `X-User-Tenant`.
    async fn test_one_budget_per_team_at_the_gateway(db: Database) {
        let t = teams(db).await;
        let base = t.users.base.clone();
        let echo = upstream("echo").await;
        let gw = gateway_for(t.users.addr(), echo.addr);
        let subscriptions = t.world.keys_of("subscriptions");
        let event = json!({"id": "evt-ent", "type": "subscription.activated", "source": "subscriptions",
            "occurred_at": t.world.clock.now_ms(),
            "data": {"user_id": t.alice.id, "subject": {"kind": "organization", "id": t.acme}, "tier": "ENTERPRISE"}});
        as_service(&subscriptions, Method::POST, ("users", &t.users), "/internal/events", Some(event)).await;
        let (mut alice, mut bob, mut carol) = (t.alice.clone(), t.bob.clone(), t.carol.clone());
        for p in [&mut alice, &mut bob, &mut carol] {
            switch(&base, p, Some(&t.acme)).await;
        }
        // The team's ENTERPRISE budget is 6 a minute, shared.
        let hit = |p: &Person| {
            let (url, token) = (gw.url("/echo/x"), p.access.clone());
            async move { client().get(url).bearer_auth(token).send().await.unwrap() }
        };
        let mut ok = 0;
        for round in 0..3 {
            for p in [&alice, &bob] {
                let r = hit(p).await;
                assert_eq!(r.status(), StatusCode::OK, "round {round}");
                ok += 1;
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["headers"]["x-user-tenant"], t.acme.as_str());
                assert_eq!(v["headers"]["x-user-tier"], "ENTERPRISE");
            }
        }
        assert_eq!(ok, 6);
        let r = hit(&carol).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains("organization's shared budget"), "{body}");
        // Personal tokens (FREE, 10 a minute each) are not in the team's budget.
        let r = hit(&t.erin).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        assert!(v["headers"].get("x-user-tenant").is_none());
        // A client cannot claim a tenant.
        let r = client().get(gw.url("/echo/y")).bearer_auth(&t.erin.access).header("x-user-tenant", t.acme.as_str()).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        assert!(v["headers"].get("x-user-tenant").is_none(), "{v}");
        // Tenant-admin routes.
        let admin_only = |p: &Person| {
            let (url, token) = (gw.url("/team-admin/z"), p.access.clone());
            async move { client().get(url).bearer_auth(token).send().await.unwrap().status() }
        };
        assert_eq!(admin_only(&carol).await, StatusCode::FORBIDDEN);
        assert_eq!(admin_only(&t.erin).await, StatusCode::FORBIDDEN);
        let r = client().get(gw.url("/team-admin/z")).bearer_auth(&bob.access).send().await.unwrap();
        assert_ne!(r.status(), StatusCode::FORBIDDEN, "bob is a tenant admin");
        // Through the gateway, the organizations API answers members only.
        let r = client().get(gw.url(&format!("/api/orgs/{}", t.acme))).bearer_auth(&t.dave.access).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let org: Value = json_of(client().get(gw.url(&format!("/api/orgs/{}", t.acme))).bearer_auth(&t.erin.access)).await;
        assert_eq!(org["error"]["code"], "not_found");
        t.users.stop().await;
    }
}

fn gateway_for(users: SocketAddr, echo: SocketAddr) -> crate::common::TestGateway {
    gateway(&format!(
        r#"upstreams:
  users: {{ backends: [{{ address: "{users}" }}] }}
  echo: {{ backends: [{{ address: "{echo}" }}] }}
auth:
  jwks: {{ url: "http://{users}/.well-known/jwks.json" }}
  issuer: tiergate-users
  audience: tiergate
rate_limit:
  tiers:
    - {{ name: FREE, per_minute: 10 }}
    - {{ name: ENTERPRISE, per_minute: 6, limit_by: tenant }}
  anonymous: {{ per_minute: 1000 }}
routes:
  - {{ name: orgs, match: {{ path: {{ prefix: /api/orgs }} }}, upstream: users, auth: required, rate_limit: false }}
  - {{ name: echo, match: {{ path: {{ prefix: /echo }} }}, upstream: echo, auth: required }}
  - {{ name: team-admin, match: {{ path: {{ prefix: /team-admin }} }}, upstream: echo, auth: required, roles: [tenant_admin], rate_limit: false }}
"#
    ))
}

both_databases! {
    /// An organization's invoice: billed to the company (legal name, NPWP,
    /// address on the PDF, the buyer's name as the contact), seen by its
    /// members acting for it, and by nobody else — not the same people
    /// acting personally, not another organization, not a guessed id.
    async fn test_an_organizations_invoices_stay_in_it(db: Database) {
        let mut t = teams(db).await;
        let base = t.users.base.clone();
        let (status, body) = call(&base, &t.alice, Method::PATCH, &format!("/api/orgs/{}", t.acme), Some(json!({
            "company": {"legal_name": "PT Acme Indonesia", "npwp": "01.234.567.8-901.000",
                        "address": "Jl. Sudirman 1, Jakarta"}}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut settings = t.world.settings::<billing::BillingService>(&[]).await;
        settings.shared.peers.insert("users".into(), base.clone());
        let billing = t.world.start::<billing::BillingService>(settings);
        let bill = billing.base.clone();
        let (status, inv) = as_service(&t.world.keys_of("subscriptions"), Method::POST, ("billing", &billing), "/internal/invoices",
            Some(json!({"reference": {"kind": "plan_change", "id": "acme-1"},
                        "subject": {"kind": "organization", "id": t.acme}, "user_id": t.alice.id,
                        "plan": "ENTERPRISE", "cycle": "monthly",
                        "lines": [{"description": "ENTERPRISE, bulanan", "unit_price": 1_999_000}]}))).await;
        assert_eq!(status, StatusCode::CREATED, "{inv}");
        let id = inv["id"].as_str().unwrap().to_owned();
        assert_eq!((inv["buyer"]["legal_name"].as_str(), inv["buyer"]["npwp"].as_str()),
            (Some("PT Acme Indonesia"), Some("0012345678901000")), "{inv}");

        // Alice's personal access token stays valid beside her Acme one.
        let alice_personal = t.alice.clone();
        switch(&base, &mut t.alice, Some(&t.acme)).await;
        switch(&base, &mut t.carol, Some(&t.acme)).await;
        switch(&base, &mut t.dave, Some(&t.beta)).await;
        let dave_beta = t.dave.clone();
        let guessed = uuid::Uuid::now_v7().to_string();
        let (one, pdf) = (format!("/api/billing/invoices/{id}"), format!("/api/billing/invoices/{id}/pdf"));
        // (who, path, expected status)
        let table: Vec<(&Person, String, u16)> = vec![
            (&t.alice, one.clone(), 200),
            (&t.carol, one.clone(), 200),
            (&t.carol, pdf.clone(), 200),
            (&alice_personal, one.clone(), 404),
            (&alice_personal, pdf.clone(), 404),
            (&dave_beta, one.clone(), 404),
            (&dave_beta, pdf.clone(), 404),
            (&t.erin, one.clone(), 404),
            (&t.alice, format!("/api/billing/invoices/{guessed}"), 404),
            (&t.alice, format!("/api/billing/credit-notes/{guessed}/pdf"), 404),
            (&t.alice, format!("/internal/invoices/{id}"), 401),
            (&t.alice, "/api/admin/invoices".to_owned(), 403),
            (&t.alice, "/api/admin/billing/revenue".to_owned(), 403),
        ];
        for (who, path, want) in table {
            let (status, answer) = as_user(Method::GET, &bill, &path, &who.access, None).await;
            assert_eq!(status.as_u16(), want, "{} GET {path}: {answer}", who.email);
            if want == 404 {
                assert!(!answer.to_string().contains("Acme"), "a 404 says nothing: {answer}");
            }
        }
        let count = |who: &Person| {
            let (bill, access) = (bill.clone(), who.access.clone());
            async move {
                let (_, list) = as_user(Method::GET, &bill, "/api/billing/invoices", &access, None).await;
                list["invoices"].as_array().unwrap().len()
            }
        };
        assert_eq!((count(&t.alice).await, count(&t.carol).await), (1, 1));
        assert_eq!((count(&alice_personal).await, count(&dave_beta).await, count(&t.erin).await), (0, 0, 0));

        let (status, _, bytes) = crate::billing::get_pdf(&bill, &pdf, &t.alice.access).await;
        assert_eq!(status, StatusCode::OK);
        let text = crate::billing::pdf_text(&t.world, &bytes);
        for want in ["PT Acme Indonesia", "NPWP 0012345678901000", "Jl. Sudirman 1, Jakarta", "alice@acme.test"] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }

        // Paying it: a tenant admin of Acme pays; a member may look but
        // not pay or cancel; no one outside Acme sees the payment.
        let sandbox = payments::sandbox::start(payments::sandbox::SandboxConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .unwrap();
        let settings = crate::payments::payments_settings(&t.world, Some(&sandbox), &t.users, &billing, &t.inbox).await;
        let payments = t.world.start::<payments::PaymentsService>(settings);
        let pay_base = payments.base.clone();
        switch(&base, &mut t.bob, Some(&t.acme)).await;
        let pay = |who: &Person, key: &str| {
            let req = client().post(format!("{pay_base}/api/payments")).bearer_auth(&who.access)
                .header("idempotency-key", key).json(&json!({"invoice_id": id, "method": "bca_va"}));
            crate::platform::send(req)
        };
        for (who, want) in [(&alice_personal, 404), (&dave_beta, 404), (&t.erin, 404), (&t.carol, 403)] {
            let (status, answer) = pay(who, &format!("k-{}", who.email)).await;
            assert_eq!(status.as_u16(), want, "{} pays Acme's invoice: {answer}", who.email);
            assert!(!answer.to_string().contains("Acme"), "a refusal says nothing: {answer}");
        }
        let (status, paid) = pay(&t.bob, "k-bob").await;
        assert_eq!(status, StatusCode::CREATED, "{paid}");
        assert_eq!((paid["status"].as_str(), paid["amount"].as_i64()), (Some("pending"), inv["total"].as_i64()), "{paid}");
        let pid = paid["id"].as_str().unwrap().to_owned();
        let mine = format!("/api/payments/{pid}");
        let listed = format!("/api/payments?invoice_id={id}");
        let table: Vec<(&Person, Method, String, u16)> = vec![
            (&t.alice, Method::GET, mine.clone(), 200),
            (&t.carol, Method::GET, mine.clone(), 200),
            (&alice_personal, Method::GET, mine.clone(), 404),
            (&dave_beta, Method::GET, mine.clone(), 404),
            (&t.erin, Method::GET, mine.clone(), 404),
            (&t.alice, Method::GET, format!("/api/payments/{guessed}"), 404),
            (&t.carol, Method::POST, format!("{mine}/cancel"), 403),
            (&dave_beta, Method::POST, format!("{mine}/cancel"), 404),
            (&t.alice, Method::GET, "/api/admin/payments".to_owned(), 403),
            (&t.alice, Method::POST, format!("/api/admin/payments/{pid}/refund"), 403),
        ];
        for (who, method, path, want) in table {
            let body = (method == Method::POST).then(|| json!({"amount": 1000, "reason": "x"}));
            let (status, answer) = as_user(method.clone(), &pay_base, &path, &who.access, body).await;
            assert_eq!(status.as_u16(), want, "{} {method} {path}: {answer}", who.email);
            if want == 404 {
                assert!(!answer.to_string().contains(&pid), "a 404 says nothing: {answer}");
            }
        }
        let count = |who: &Person| {
            let (base, access, listed) = (pay_base.clone(), who.access.clone(), listed.clone());
            async move {
                let (_, list) = as_user(Method::GET, &base, &listed, &access, None).await;
                list["payments"].as_array().unwrap().len()
            }
        };
        assert_eq!((count(&t.alice).await, count(&t.carol).await), (1, 1));
        assert_eq!((count(&alice_personal).await, count(&dave_beta).await, count(&t.erin).await), (0, 0, 0));
        payments.stop().await;
        sandbox.stop().await;
        billing.stop().await;
        t.users.stop().await;
    }
}

both_databases! {
    /// An organization's plan is its own: only its owner or admin checks
    /// out or cancels (a member reads), the invoice names the
    /// organization, and once paid every member's token for it carries the
    /// organization's tier, while their personal plans and other
    /// organizations stay FREE.
    async fn test_an_organizations_plan_is_its_own(db: Database) {
        let mut t = teams(db).await;
        let base = t.users.base.clone();
        let subs_addr = format!("127.0.0.1:{}", crate::common::free_port());
        let subs_base = format!("http://{subs_addr}");
        let mut bs = t.world.settings::<billing::BillingService>(&[]).await;
        bs.shared.peers.insert("users".into(), base.clone());
        bs.shared.events = crate::platform::subscribers_of(&[("*", t.inbox.url(), "notifications")]);
        bs.shared.events.entry("invoice.paid".into()).or_default()
            .push(backend_common::outbox::Subscriber::service("subscriptions", &subs_base));
        let billing = t.world.start::<billing::BillingService>(bs);
        let mut ss = t.world.settings::<subscriptions::SubscriptionsService>(&[("TIERGATE_SUBSCRIPTIONS_LISTEN", &subs_addr)]).await;
        ss.shared.peers.insert("billing".into(), billing.base.clone());
        ss.shared.peers.insert("users".into(), base.clone());
        ss.shared.events.entry("subscription.activated".into()).or_default()
            .push(backend_common::outbox::Subscriber::service("users", &base));
        let subs = t.world.start::<subscriptions::SubscriptionsService>(ss);
        let alice_personal = t.alice.clone();
        switch(&base, &mut t.alice, Some(&t.acme)).await;
        switch(&base, &mut t.carol, Some(&t.acme)).await;
        switch(&base, &mut t.dave, Some(&t.beta)).await;
        let checkout = |who: &Person, key: &str| {
            let (url, access, key) = (subs.url("/api/subscriptions/checkout"), who.access.clone(), key.to_owned());
            async move { crate::platform::post_keyed(&url, &access, &key, &json!({"plan": "ENTERPRISE", "cycle": "monthly"})).await }
        };
        let (status, e, _) = checkout(&t.carol, "k-carol").await;
        assert_eq!((status, e["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("tenant_admin_required")), "{e}");
        let (status, e) = as_user(Method::POST, &subs.base, "/api/subscriptions/cancel", &t.carol.access, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{e}");
        let (status, change, _) = checkout(&t.alice, "k-alice").await;
        assert_eq!(status, StatusCode::CREATED, "{change}");
        let invoice = change["invoice"]["id"].as_str().unwrap().to_owned();
        let (status, inv) = as_user(Method::GET, &billing.base, &format!("/api/billing/invoices/{invoice}"), &t.carol.access, None).await;
        assert_eq!((status, inv["subject"]["kind"].as_str(), inv["subject"]["id"].as_str()), (StatusCode::OK, Some("organization"), Some(t.acme.as_str())), "{inv}");

        // Payments reports the money in; billing marks the invoice paid.
        let settled = json!({"id": uuid::Uuid::now_v7().to_string(), "type": "payment.settled", "source": "payments",
            "occurred_at": t.world.clock.now_ms(),
            "data": {"payment_id": "pay-acme-1", "invoice_id": invoice, "amount": inv["total"], "method": "bca_va",
                     "user_id": t.alice.id, "subject": {"kind": "organization", "id": t.acme}}});
        let r = client().post(billing.url("/internal/events")).bearer_auth(t.world.keys_of("payments").issue("billing")).json(&settled).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let me = eventually("ENTERPRISE for Acme", || async {
            let (_, me) = as_user(Method::GET, &subs.base, "/api/subscriptions/me", &t.carol.access, None).await;
            (me["plan"] == "ENTERPRISE").then_some(me)
        }).await;
        assert_eq!((me["subject"]["kind"].as_str(), me["subject"]["id"].as_str()), (Some("organization"), Some(t.acme.as_str())), "{me}");
        for (who, name) in [(&alice_personal, "alice personally"), (&t.dave, "dave in Beta"), (&t.erin, "erin")] {
            let (_, me) = as_user(Method::GET, &subs.base, "/api/subscriptions/me", &who.access, None).await;
            assert_eq!(me["plan"], "FREE", "{name}: {me}");
        }
        // Acme's tier reaches the users service: a member's next token for
        // Acme carries it (switching again rotates her pair each time).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while switch(&base, &mut t.carol, Some(&t.acme)).await["tier"] != "ENTERPRISE" {
            assert!(std::time::Instant::now() < deadline, "Acme's tier never reached the users service");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let c = switch(&base, &mut t.carol, None).await;
        assert_eq!(c["tier"], "FREE", "carol personally: {c}");
        subs.stop().await;
        billing.stop().await;
        t.users.stop().await;
    }
}
