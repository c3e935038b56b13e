//! The subscriptions service's logic: the plan catalogue, a subject's
//! subscription, checkouts (a change billed by one invoice, with the
//! unused part of the current period credited) and the change applied
//! when billing says its invoice was paid.

use actix_web::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use backend_common::calendar::BusinessCalendar;
use backend_common::client::{CallError, ServiceClient};
use backend_common::clock::Clock;
use backend_common::consumer::Applied;
use backend_common::db::Db;
use backend_common::outbox::{Event, Outbox};
use backend_common::tax::Totals;
use backend_common::user_auth::{Subject, UserClaims};
use backend_common::{ApiError, FieldError};

use crate::config::{Cycle, Plan, SubscriptionsConfig};
use crate::periods::{self, Credit, Period};
use crate::state::{self, Input, State};
use crate::storage::{self, ChangeRow, SubscriptionRow};

type Api<T> = Result<T, ApiError>;

/// The service's state.
pub struct Subscriptions {
    /// Its database.
    pub db: Db,
    /// Its outbox.
    pub outbox: Outbox,
    /// Its clock.
    pub clock: Clock,
    /// The business calendar (periods).
    pub calendar: BusinessCalendar,
    /// Calls to billing.
    pub client: ServiceClient,
    /// Its settings.
    pub config: SubscriptionsConfig,
    /// The gateway's tier table (the plans' limits).
    pub tiers: crate::tiers::TierTable,
}

/// One cycle's price of a plan.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Price {
    /// `monthly` or `yearly`.
    pub cycle: Cycle,
    /// Whole rupiah before PPN (what the invoice's line says).
    pub price: i64,
    /// PPN on it (12% of a DPP of 11/12), for display; the invoice
    /// computes it once for all its lines.
    pub ppn: i64,
    /// `price + ppn`.
    pub total: i64,
    /// `price` per month (a yearly price divided by 12, rounded down).
    pub per_month: i64,
}

/// A plan as the pricing page shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PlanView {
    /// `PREMIUM`.
    pub name: String,
    /// The tier it grants (the gateway's limits).
    pub tier: String,
    /// One line about it.
    pub description: String,
    /// Requests a month it includes; none: no quota.
    pub quota: Option<u64>,
    /// The rate limits of its tier, as the gateway enforces them; none
    /// when the gateway's config cannot be read.
    pub limits: Option<crate::tiers::TierLimits>,
    /// Monthly and yearly.
    pub prices: Vec<Price>,
}

/// The plan list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PlanList {
    /// Lowest first.
    pub plans: Vec<PlanView>,
    /// `IDR`.
    pub currency: &'static str,
}

/// A subject.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SubjectView {
    /// `user` or `organization`.
    pub kind: String,
    /// Its id.
    pub id: String,
}

/// An invoice a change is billed by.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InvoiceRef {
    /// Billing's id (pay it with `POST /api/payments`).
    pub id: String,
    /// `INV/2026/12/000123`.
    pub number: String,
    /// What is due, PPN included.
    pub total: i64,
}

/// A line of a change's invoice.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Line {
    /// What it is.
    pub description: String,
    /// How many.
    pub quantity: i64,
    /// Whole rupiah before PPN; negative: a credit.
    pub unit_price: i64,
}

/// A plan change: what the subject asked for, billed by one invoice,
/// applied when it is paid.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Change {
    /// Id (the invoice's reference).
    pub id: String,
    /// `checkout` or `renewal`.
    pub kind: String,
    /// The plan it moves to.
    pub plan: String,
    /// Its cycle.
    pub cycle: String,
    /// The plan it replaces, when a paid one.
    pub from_plan: Option<String>,
    /// `pending` (its invoice unpaid), `applied`, `superseded` (another
    /// checkout replaced it), `unapplied` (paid after a higher plan was
    /// applied: left for a refund).
    pub status: String,
    /// The unused part of the replaced plan's period, and its arithmetic.
    #[schema(value_type = Option<Object>)]
    pub credit: Option<Value>,
    /// The invoice's lines.
    pub lines: Vec<Line>,
    /// The invoice.
    pub invoice: Option<InvoiceRef>,
    /// Created (Unix ms).
    pub created_at: i64,
}

/// The next renewal.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Renewal {
    /// When the period ends and the next begins (Unix ms).
    pub at: i64,
    /// The same in the business time zone (`2026-12-31T10:00:00+07:00`).
    pub at_local: String,
    /// The next period's price before PPN.
    pub price: i64,
    /// With PPN.
    pub total: i64,
}

/// A downgrade scheduled for the period's end.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Scheduled {
    /// The plan from then on.
    pub plan: String,
    /// Its cycle.
    pub cycle: String,
    /// When (the period's end, Unix ms).
    pub at: i64,
}

/// `POST /api/subscriptions/downgrade`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DowngradeRequest {
    /// A paid plan below the current one (FREE: cancel instead).
    pub plan: String,
    /// Its cycle; the current one when omitted.
    #[serde(default)]
    pub cycle: Option<Cycle>,
}

/// A subject's subscription.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SubscriptionView {
    /// Whose.
    pub subject: SubjectView,
    /// Its id; none for a subject that never subscribed.
    pub id: Option<String>,
    /// The plan in force (`FREE` unless the state grants the subscribed
    /// plan).
    pub plan: String,
    /// Its tier.
    pub tier: String,
    /// `free` (never subscribed), `pending`, `active`, `past_due`,
    /// `canceled`, `expired`.
    pub state: String,
    /// The plan subscribed to (it may not be in force yet, or any more).
    pub subscribed_plan: Option<String>,
    /// `monthly` or `yearly`.
    pub cycle: Option<String>,
    /// The current period (Unix ms).
    pub period_start: Option<i64>,
    /// Its end.
    pub period_end: Option<i64>,
    /// The period in the business time zone.
    pub period_start_local: Option<String>,
    /// Its end there.
    pub period_end_local: Option<String>,
    /// Whether it ends at the period's end.
    pub cancel_at_period_end: bool,
    /// A downgrade taking effect at the period's end.
    pub scheduled_change: Option<Scheduled>,
    /// A checkout waiting for its invoice to be paid.
    pub pending_change: Option<Change>,
    /// When it renews and for how much (none when it will not).
    pub next_renewal: Option<Renewal>,
    /// The business time zone.
    pub time_zone: String,
}

/// `POST /api/subscriptions/checkout`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// A plan above the current one (`BASIC`, `PREMIUM`, `ENTERPRISE`).
    pub plan: String,
    /// `monthly` or `yearly`.
    pub cycle: Cycle,
}

/// `POST /api/admin/subscriptions/{user_id}/grant`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// A paid plan, given without an invoice.
    pub plan: String,
    /// Until when (Unix ms; in the future, within 5 years). It ends then
    /// as a cancellation does (FREE), unless the user pays meanwhile.
    pub until: i64,
}

/// A subscription as an admin lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdminSubscription {
    /// Id.
    pub id: String,
    /// Whose.
    pub subject: SubjectView,
    /// Who acted last for the subject.
    pub user_id: String,
    /// The plan subscribed to.
    pub plan: String,
    /// `monthly` or `yearly`.
    pub cycle: String,
    /// `pending`, `active`, `past_due`, `canceled`, `expired`.
    pub state: String,
    /// The current period (Unix ms).
    pub period_start: i64,
    /// Its end.
    pub period_end: i64,
    /// Whether it ends at the period's end.
    pub cancel_at_period_end: bool,
    /// A downgrade scheduled for the period's end.
    pub scheduled_plan: Option<String>,
    /// Created (Unix ms).
    pub created_at: i64,
}

/// A page of subscriptions.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdminPage {
    /// Newest first.
    pub subscriptions: Vec<AdminSubscription>,
    /// The `cursor` of the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// An answer and how to send it.
pub struct Answered {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON.
    pub body: String,
    /// The same key's answer again.
    pub replayed: bool,
}

fn db_err(e: sqlx::Error) -> ApiError {
    ApiError::from(e)
}

pub(crate) fn subject_of(s: &Subject) -> SubjectView {
    SubjectView {
        kind: s.kind().to_owned(),
        id: s.id().to_owned(),
    }
}

/// PPN on `price` alone, for display.
fn with_ppn(price: i64) -> (i64, i64) {
    match Totals::of_subtotal(price, true) {
        Ok(t) => (t.ppn, t.total),
        Err(_) => (0, price),
    }
}

fn cycle_word(cycle: Cycle) -> &'static str {
    match cycle {
        Cycle::Monthly => "bulanan",
        Cycle::Yearly => "tahunan",
    }
}

impl Subscriptions {
    /// The plan catalogue.
    pub fn plans(&self) -> PlanList {
        let view = |p: &Plan| PlanView {
            name: p.name.clone(),
            tier: p.tier().to_owned(),
            description: p.description.clone(),
            quota: p.quota,
            limits: self.tiers.limits(p.tier()),
            prices: [Cycle::Monthly, Cycle::Yearly]
                .into_iter()
                .map(|cycle| {
                    let price = p.price(cycle);
                    let (ppn, total) = with_ppn(price);
                    Price {
                        cycle,
                        price,
                        ppn,
                        total,
                        per_month: price / cycle.months(),
                    }
                })
                .collect(),
        };
        PlanList {
            plans: self.config.plans.iter().map(view).collect(),
            currency: "IDR",
        }
    }

    fn local(&self, ms: i64) -> String {
        self.calendar
            .zoned(ms)
            .map(|z| z.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string())
            .unwrap_or_default()
    }

    fn change_view(&self, ch: &ChangeRow) -> Change {
        Change {
            id: ch.id.clone(),
            kind: ch.kind.clone(),
            plan: ch.plan.clone(),
            cycle: ch.cycle.clone(),
            from_plan: ch.from_plan.clone(),
            status: ch.status.clone(),
            credit: ch
                .credit_detail
                .as_deref()
                .and_then(|c| serde_json::from_str(c).ok()),
            lines: serde_json::from_str(&ch.lines).unwrap_or_default(),
            invoice: match (&ch.invoice_id, &ch.invoice_number, ch.invoice_total) {
                (Some(id), Some(number), Some(total)) => Some(InvoiceRef {
                    id: id.clone(),
                    number: number.clone(),
                    total,
                }),
                _ => None,
            },
            created_at: ch.created_at,
        }
    }

    /// The rank of the plan `sub` grants now (0: FREE).
    fn granted_rank(&self, sub: Option<&SubscriptionRow>) -> usize {
        sub.filter(|s| State::parse(&s.state).is_some_and(State::grants_tier))
            .and_then(|s| self.config.plan(&s.plan))
            .map_or(0, |(rank, _)| rank)
    }

    /// The caller's subject's subscription.
    pub async fn me(&self, subject: &Subject) -> Api<SubscriptionView> {
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let sub = storage::subscription_of(&mut c, subject.kind(), subject.id())
            .await
            .map_err(db_err)?;
        let pending = storage::pending_change(&mut c, subject.kind(), subject.id())
            .await
            .map_err(db_err)?;
        drop(c);
        let free = self.config.free();
        let granted = self.granted_rank(sub.as_ref());
        let in_force = self.config.plans.get(granted).unwrap_or(free);
        let mut view = SubscriptionView {
            subject: subject_of(subject),
            id: None,
            plan: in_force.name.clone(),
            tier: in_force.tier().to_owned(),
            state: "free".to_owned(),
            subscribed_plan: None,
            cycle: None,
            period_start: None,
            period_end: None,
            period_start_local: None,
            period_end_local: None,
            cancel_at_period_end: false,
            scheduled_change: None,
            pending_change: pending.as_ref().map(|p| self.change_view(p)),
            next_renewal: None,
            time_zone: self.calendar.zone_name().to_owned(),
        };
        if let Some(s) = &sub {
            let state = State::parse(&s.state);
            view.id = Some(s.id.clone());
            view.state = s.state.clone();
            view.subscribed_plan = Some(s.plan.clone());
            view.cycle = Some(s.cycle.clone());
            view.cancel_at_period_end = s.cancel_at_period_end != 0;
            view.scheduled_change = match (&s.scheduled_plan, &s.scheduled_cycle) {
                (Some(plan), Some(cycle)) => Some(Scheduled {
                    plan: plan.clone(),
                    cycle: cycle.clone(),
                    at: s.period_end,
                }),
                _ => None,
            };
            if state != Some(State::Pending) {
                view.period_start = Some(s.period_start);
                view.period_end = Some(s.period_end);
                view.period_start_local = Some(self.local(s.period_start));
                view.period_end_local = Some(self.local(s.period_end));
            }
            let renews = state.is_some_and(State::grants_tier) && s.cancel_at_period_end == 0;
            let (next_plan, next_cycle) = match (&s.scheduled_plan, &s.scheduled_cycle) {
                (Some(p), Some(c)) => (p.as_str(), c.as_str()),
                _ => (s.plan.as_str(), s.cycle.as_str()),
            };
            if let (true, Some((_, plan)), Some(cycle)) = (
                renews,
                self.config.plan(next_plan),
                Cycle::parse(next_cycle),
            ) {
                let price = plan.price(cycle);
                view.next_renewal = Some(Renewal {
                    at: s.period_end,
                    at_local: self.local(s.period_end),
                    price,
                    total: with_ppn(price).1,
                });
            }
        }
        Ok(view)
    }

    /// Starts an upgrade: a change and its invoice at billing. The same
    /// key and request answers the same; the same key with another
    /// request is 422.
    pub async fn checkout(
        &self,
        user: &UserClaims,
        key: &str,
        req: &CheckoutRequest,
    ) -> Api<Answered> {
        let subject = user.subject();
        let Some((rank, plan)) = self.config.plan(&req.plan) else {
            let names: Vec<&str> = self.config.plans.iter().map(|p| p.name.as_str()).collect();
            return Err(ApiError::validation(vec![FieldError::new(
                "plan",
                format!("one of {}", names[1..].join(", ")),
            )]));
        };
        if rank == 0 {
            return Err(ApiError::validation(vec![FieldError::new(
                "plan",
                "FREE needs no checkout: cancel the subscription instead",
            )]));
        }
        let hash = backend_common::token_hash(&format!("{}|{}", plan.name, req.cycle.as_str()));
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let change = match storage::change_by_key(&mut c, subject.kind(), subject.id(), key)
            .await
            .map_err(db_err)?
        {
            Some(ch) => ch,
            None => {
                let sub = storage::subscription_of(&mut c, subject.kind(), subject.id())
                    .await
                    .map_err(db_err)?;
                let row = self.new_change(
                    user,
                    &subject,
                    key,
                    &hash,
                    rank,
                    plan,
                    req.cycle,
                    sub.as_ref(),
                )?;
                if storage::insert_change(&mut c, &row).await.map_err(db_err)? {
                    row
                } else {
                    // The same key at the same moment: theirs.
                    storage::change_by_key(&mut c, subject.kind(), subject.id(), key)
                        .await
                        .map_err(db_err)?
                        .ok_or_else(|| ApiError::internal(&"a change vanished"))?
                }
            }
        };
        drop(c);
        if change.request_hash.as_deref() != Some(hash.as_str()) {
            return Err(ApiError::validation(vec![FieldError::new(
                "Idempotency-Key",
                "this key was sent with another checkout; use a new key",
            )]));
        }
        if let Some(answer) = &change.answer {
            return Ok(Answered {
                status: StatusCode::OK,
                body: answer.clone(),
                replayed: true,
            });
        }
        let (id, number, total) = self.bill(&change).await?;
        self.config.failpoints.hit("checkout.after_invoice")?;
        let mut done = change.clone();
        done.invoice_id = Some(id);
        done.invoice_number = Some(number.clone());
        done.invoice_total = Some(total);
        done.status = "pending".to_owned();
        let answer = |ch: &ChangeRow| {
            serde_json::to_string(&self.change_view(ch)).map_err(|e| ApiError::internal(&e))
        };
        let lost = ChangeRow {
            status: "superseded".to_owned(),
            ..done.clone()
        };
        let lost = answer(&lost)?;
        done.answer = Some(answer(&done)?);
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await.map_err(db_err)?;
        let body = if storage::set_invoiced(&mut tx, &done, &lost, now)
            .await
            .map_err(db_err)?
        {
            done.answer.clone().unwrap_or_default()
        } else {
            // A newer checkout of the subject won meanwhile.
            lost
        };
        let first = SubscriptionRow {
            id: uuid::Uuid::now_v7().to_string(),
            subject_kind: done.subject_kind.clone(),
            subject_id: done.subject_id.clone(),
            user_id: done.user_id.clone(),
            plan: done.plan.clone(),
            cycle: done.cycle.clone(),
            state: State::Pending.as_str().to_owned(),
            anchor_at: now,
            period_start: now,
            period_end: now,
            cancel_at_period_end: 0,
            scheduled_plan: None,
            scheduled_cycle: None,
            created_at: now,
            updated_at: now,
        };
        // A subject's first checkout makes its (pending) subscription.
        storage::insert_subscription(&mut tx, &first)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        tracing::info!(change = %done.id, plan = %done.plan, invoice = %number, "checkout invoiced");
        Ok(Answered {
            status: StatusCode::CREATED,
            body,
            replayed: false,
        })
    }

    /// Asks billing for the invoice of change `ch`: its id, number and
    /// total. Billing makes one invoice per reference (the change), so
    /// asking again after a crash, or beside a concurrent retry or another
    /// instance, gets the same invoice.
    async fn bill(&self, ch: &ChangeRow) -> Api<(String, String, i64)> {
        let kind = if ch.kind == "renewal" {
            "renewal"
        } else {
            "plan_change"
        };
        let mut body = json!({
            "reference": {"kind": kind, "id": ch.id},
            "subject": {"kind": ch.subject_kind, "id": ch.subject_id},
            "user_id": ch.user_id,
            "plan": ch.plan,
            "cycle": ch.cycle,
            "lines": serde_json::from_str::<Value>(&ch.lines).unwrap_or(Value::Null),
        });
        if let Some(start) = ch.period_start {
            // A renewal is due when the period it pays begins.
            body["due_at"] = json!(start);
        }
        let invoice: Value = self
            .client
            .post("billing", "/internal/invoices", &body, None)
            .await?;
        match (
            invoice["id"].as_str(),
            invoice["number"].as_str(),
            invoice["total"].as_i64(),
        ) {
            (Some(id), Some(number), Some(total)) => Ok((id.to_owned(), number.to_owned(), total)),
            _ => Err(ApiError::internal(
                &"billing answered an invoice without id, number or total",
            )),
        }
    }

    // ---- the lifecycle scheduler ------------------------------------------

    /// One pass: renewal invoices for periods ending within the renewal
    /// lead (and any whose invoice was not made yet), then the periods
    /// that ended (`past_due`, or `canceled`), then the grace periods that
    /// ran out (`expired`). Bounded work per step; safe with several
    /// instances (one renewal per period by a unique key, every move an
    /// optimistic write). How many things it did. `at_start`: the first
    /// pass of this process, which also invoices renewals recorded just
    /// now (a crash between recording and invoicing).
    pub async fn scheduler_pass(&self, at_start: bool) -> Api<usize> {
        const BATCH: i64 = 100;
        let now = self.clock.now_ms();
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let mut done = 0;
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let due = storage::due_renewals(
            &mut c,
            now.saturating_add(ms(self.config.renewal_lead)),
            BATCH,
        )
        .await
        .map_err(db_err)?;
        drop(c);
        for sub in due {
            match self.open_renewal(&sub, now).await {
                Ok(()) => done += 1,
                Err(e) => {
                    tracing::warn!(subscription = %sub.id, error = %e, "renewal not invoiced yet; retried")
                }
            }
        }
        done += self.void_superseded(BATCH).await?;
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        // Older than a few seconds: not one a running pass is invoicing
        // (which would only ask billing twice for the same invoice: it
        // answers one per reference). At start none of ours is running.
        let settled = if at_start { now } else { now - 5_000 };
        let stuck = storage::uninvoiced(&mut c, settled, BATCH)
            .await
            .map_err(db_err)?;
        drop(c);
        for ch in stuck {
            match self.invoice_renewal(&ch).await {
                Ok(()) => done += 1,
                Err(e) => {
                    tracing::warn!(change = %ch.id, error = %e, "renewal not invoiced yet; retried")
                }
            }
        }
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let ended = storage::ended(&mut c, State::Active.as_str(), now, BATCH)
            .await
            .map_err(db_err)?;
        let grace_over = storage::ended(
            &mut c,
            State::PastDue.as_str(),
            now.saturating_sub(ms(self.config.grace)),
            BATCH,
        )
        .await
        .map_err(db_err)?;
        drop(c);
        for sub in ended {
            let input = if sub.cancel_at_period_end != 0 {
                Input::PeriodEndedCanceling
            } else {
                Input::PeriodEndedUnpaid
            };
            if self.move_at_end(&sub, input).await? {
                done += 1;
            }
        }
        for sub in grace_over {
            if self.move_at_end(&sub, Input::GraceOver).await? {
                done += 1;
            }
        }
        Ok(done)
    }

    /// Makes the renewal of `sub`'s next period (the scheduled plan, if a
    /// downgrade waits) and its invoice.
    async fn open_renewal(&self, sub: &SubscriptionRow, now: i64) -> Api<()> {
        let (plan_name, cycle_name) = match (&sub.scheduled_plan, &sub.scheduled_cycle) {
            (Some(p), Some(c)) => (p.as_str(), c.as_str()),
            _ => (sub.plan.as_str(), sub.cycle.as_str()),
        };
        let (Some((_, plan)), Some(cycle)) =
            (self.config.plan(plan_name), Cycle::parse(cycle_name))
        else {
            return Err(ApiError::internal(&format!(
                "plan {plan_name} {cycle_name} is not configured"
            )));
        };
        let next = self.next_period(sub, cycle)?;
        let day = |ms: i64| {
            self.calendar
                .date(ms)
                .map(BusinessCalendar::format_id)
                .unwrap_or_default()
        };
        let lines = vec![Line {
            description: format!(
                "{}, {} ({} – {})",
                plan.name,
                cycle_word(cycle),
                day(next.start),
                day(next.end)
            ),
            quantity: 1,
            unit_price: plan.price(cycle),
        }];
        let row = ChangeRow {
            id: uuid::Uuid::now_v7().to_string(),
            subject_kind: sub.subject_kind.clone(),
            subject_id: sub.subject_id.clone(),
            user_id: sub.user_id.clone(),
            kind: "renewal".to_owned(),
            plan: plan.name.clone(),
            cycle: cycle.as_str().to_owned(),
            from_plan: Some(sub.plan.clone()),
            credit: 0,
            credit_detail: None,
            lines: serde_json::to_string(&lines).map_err(|e| ApiError::internal(&e))?,
            status: "creating".to_owned(),
            idem_key: None,
            request_hash: None,
            renewal_key: Some(format!("{}:{}", sub.id, sub.period_end)),
            invoice_id: None,
            invoice_number: None,
            invoice_total: None,
            answer: None,
            applied_at: None,
            created_at: now,
            updated_at: now,
            period_start: Some(sub.period_end),
        };
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        if !storage::insert_change(&mut c, &row).await.map_err(db_err)? {
            // Another instance (or pass) made this period's renewal.
            return Ok(());
        }
        drop(c);
        self.config.failpoints.hit("renewal.after_change")?;
        self.invoice_renewal(&row).await
    }

    /// Voids at billing the invoices of superseded changes: checkouts a
    /// newer checkout replaced, renewals of periods an upgrade replaced;
    /// the customer cannot pay them (and sees one invoice to pay). One paid meanwhile is left alone: `invoice.paid`
    /// applies it or leaves it for a refund. How many it settled.
    async fn void_superseded(&self, limit: i64) -> Api<usize> {
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let open = storage::superseded_open(&mut c, limit)
            .await
            .map_err(db_err)?;
        drop(c);
        let mut done = 0;
        for (change, invoice) in open {
            let path = format!("/internal/invoices/{invoice}/void");
            let body = json!({"reason": "replaced by a newer plan change"});
            // Voiding again with the same reason is the same request: safe
            // to repeat.
            let key = format!("void-{invoice}");
            match self
                .client
                .post::<_, Value>("billing", &path, &body, Some(&key))
                .await
            {
                Ok(_) => {}
                // Paid already (or voided for another reason): nothing to
                // void; the payment is handled by the consumer.
                Err(CallError::Refused { status: 409, .. }) => {}
                Err(e) => {
                    tracing::warn!(change = %change, invoice = %invoice, error = %e,
                        "superseded invoice not voided yet; retried");
                    continue;
                }
            }
            let mut c = self.db.pool().acquire().await.map_err(db_err)?;
            storage::mark_invoice_settled(&mut c, &change, self.clock.now_ms())
                .await
                .map_err(db_err)?;
            done += 1;
        }
        Ok(done)
    }

    /// Bills renewal `ch` and records its invoice.
    async fn invoice_renewal(&self, ch: &ChangeRow) -> Api<()> {
        let (id, number, total) = self.bill(ch).await?;
        let done = ChangeRow {
            invoice_id: Some(id),
            invoice_number: Some(number.clone()),
            invoice_total: Some(total),
            ..ch.clone()
        };
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        storage::set_invoiced(&mut c, &done, "", self.clock.now_ms())
            .await
            .map_err(db_err)?;
        tracing::info!(change = %ch.id, invoice = %number, "renewal invoiced");
        Ok(())
    }

    /// The period after `sub`'s current one, on `cycle`: the
    /// same anchor when the cycle stays, else anchored where it begins.
    fn next_period(&self, sub: &SubscriptionRow, cycle: Cycle) -> Api<Period> {
        let calendar_err = |e: backend_common::calendar::CalendarError| ApiError::internal(&e);
        if sub.cycle == cycle.as_str() {
            let (_, p) = periods::containing(&self.calendar, sub.anchor_at, cycle, sub.period_end)
                .map_err(calendar_err)?;
            Ok(p)
        } else {
            periods::nth(&self.calendar, sub.period_end, cycle, 0).map_err(calendar_err)
        }
    }

    /// Moves `sub` (as read) by `input` at a period's end, with its
    /// events; false when someone moved it meanwhile or it does not apply.
    async fn move_at_end(&self, sub: &SubscriptionRow, input: Input) -> Api<bool> {
        let Some(from) = State::parse(&sub.state) else {
            return Ok(false);
        };
        let Some(to) = state::step(from, input) else {
            return Ok(false);
        };
        let now = self.clock.now_ms();
        let mut row = sub.clone();
        row.state = to.as_str().to_owned();
        row.updated_at = now.max(sub.updated_at + 1);
        let mut tx = self.db.begin_write().await.map_err(db_err)?;
        if !storage::update_subscription(&mut tx, &row, sub.updated_at)
            .await
            .map_err(db_err)?
        {
            return Ok(false);
        }
        let events: &[&str] = match to {
            State::PastDue => &["subscription.past_due"],
            State::Canceled => &["subscription.canceled", "subscription.ended"],
            State::Expired => &["subscription.ended"],
            _ => &[],
        };
        for kind in events {
            self.outbox
                .enqueue(&mut tx, kind, &self.event_data(&row, to), now)
                .await
                .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        self.outbox.notify();
        tracing::info!(subscription = %row.id, from = from.as_str(), to = to.as_str(), "subscription moved");
        Ok(true)
    }

    /// The data of a subscription event.
    fn event_data(&self, row: &SubscriptionRow, state: State) -> Value {
        let tier = if state.grants_tier() {
            self.config
                .plan(&row.plan)
                .map_or("FREE", |(_, p)| p.tier())
                .to_owned()
        } else {
            self.config.free().tier().to_owned()
        };
        json!({
            "subscription_id": row.id,
            "user_id": row.user_id,
            "subject": {"kind": row.subject_kind, "id": row.subject_id},
            "tier": tier,
            "plan": row.plan,
            "cycle": row.cycle,
            "state": state.as_str(),
            "period_start": row.period_start,
            "period_end": row.period_end,
        })
    }

    /// The change row of a checkout to `plan`: its lines (the new plan's
    /// price, less the unused part of the current paid period).
    #[allow(clippy::too_many_arguments)]
    fn new_change(
        &self,
        user: &UserClaims,
        subject: &Subject,
        key: &str,
        hash: &str,
        rank: usize,
        plan: &Plan,
        cycle: Cycle,
        sub: Option<&SubscriptionRow>,
    ) -> Api<ChangeRow> {
        let now = self.clock.now_ms();
        let current = self.granted_rank(sub);
        let same_plan_longer = current == rank
            && sub.is_some_and(|s| s.cycle == Cycle::Monthly.as_str())
            && cycle == Cycle::Yearly;
        if rank < current || (rank == current && !same_plan_longer) {
            return Err(ApiError::conflict(
                "not_an_upgrade",
                format!(
                    "{} is not above the plan in force; POST /api/subscriptions/downgrade schedules a lower plan for the period's end",
                    plan.name
                ),
            ));
        }
        let price = plan.price(cycle);
        let mut lines = vec![Line {
            description: format!("{}, {}", plan.name, cycle_word(cycle)),
            quantity: 1,
            unit_price: price,
        }];
        let mut credit: Option<Credit> = None;
        let mut from_plan = None;
        if let Some(s) = sub.filter(|_| current > 0) {
            let old_cycle = Cycle::parse(&s.cycle).unwrap_or(Cycle::Monthly);
            let old_price = self.config.plans[current].price(old_cycle);
            let mut c = periods::credit(
                &s.plan,
                old_price,
                Period {
                    start: s.period_start,
                    end: s.period_end,
                },
                now,
            );
            // A credit never makes the invoice negative (what is left
            // over is not carried: documented).
            c.amount = c.amount.min(price);
            from_plan = Some(s.plan.clone());
            if c.amount > 0 {
                lines.push(Line {
                    description: format!(
                        "Kredit sisa periode {} ({})",
                        s.plan,
                        cycle_word(old_cycle)
                    ),
                    quantity: 1,
                    unit_price: -c.amount,
                });
            }
            credit = Some(c);
        }
        Ok(ChangeRow {
            id: uuid::Uuid::now_v7().to_string(),
            subject_kind: subject.kind().to_owned(),
            subject_id: subject.id().to_owned(),
            user_id: user.user_id.clone(),
            kind: "checkout".to_owned(),
            plan: plan.name.clone(),
            cycle: cycle.as_str().to_owned(),
            from_plan,
            credit: credit.as_ref().map_or(0, |c| c.amount),
            credit_detail: credit.as_ref().and_then(|c| serde_json::to_string(c).ok()),
            lines: serde_json::to_string(&lines).map_err(|e| ApiError::internal(&e))?,
            status: "creating".to_owned(),
            idem_key: Some(key.to_owned()),
            request_hash: Some(hash.to_owned()),
            renewal_key: None,
            invoice_id: None,
            invoice_number: None,
            invoice_total: None,
            answer: None,
            applied_at: None,
            created_at: now,
            updated_at: now,
            period_start: None,
        })
    }

    /// Subscriptions newest first, by state and plan, a page at a time.
    pub async fn admin_list(
        &self,
        state: Option<&str>,
        plan: Option<&str>,
        cursor: Option<&str>,
        limit: i64,
    ) -> Api<AdminPage> {
        if let Some(s) = state.filter(|s| State::parse(s).is_none()) {
            return Err(ApiError::validation(vec![FieldError::new(
                "state",
                format!("`{s}` is not pending, active, past_due, canceled or expired"),
            )]));
        }
        let plan = plan.map(str::to_ascii_uppercase);
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let rows = storage::list(&mut c, state, plan.as_deref(), cursor, limit)
            .await
            .map_err(db_err)?;
        let next_cursor = (rows.len() as i64 == limit)
            .then(|| rows.last().map(|r| r.id.clone()))
            .flatten();
        Ok(AdminPage {
            subscriptions: rows
                .into_iter()
                .map(|r| AdminSubscription {
                    subject: SubjectView {
                        kind: r.subject_kind,
                        id: r.subject_id,
                    },
                    id: r.id,
                    user_id: r.user_id,
                    plan: r.plan,
                    cycle: r.cycle,
                    state: r.state,
                    period_start: r.period_start,
                    period_end: r.period_end,
                    cancel_at_period_end: r.cancel_at_period_end != 0,
                    scheduled_plan: r.scheduled_plan,
                    created_at: r.created_at,
                })
                .collect(),
            next_cursor,
        })
    }

    /// Gives user `user_id` (personally) `plan` until `until`, without an
    /// invoice: active now, ending then as a cancellation does.
    /// `subscription.activated` tells the users service. Recorded as a
    /// `grant` change naming the admin.
    pub async fn grant(
        &self,
        admin: &UserClaims,
        user_id: &str,
        req: &GrantRequest,
    ) -> Api<SubscriptionView> {
        let now = self.clock.now_ms();
        let mut v = backend_common::Validator::new();
        let plan = self.config.plan(&req.plan).filter(|(rank, _)| *rank > 0);
        v.check(plan.is_some(), "plan", "a paid plan");
        v.check(
            req.until > now && req.until <= now + 5 * 366 * 86_400_000,
            "until",
            "in the future, within 5 years (Unix ms)",
        );
        v.finish()?;
        let Some((_, plan)) = plan else {
            return Err(ApiError::internal(&"a checked plan vanished"));
        };
        match self
            .client
            .get::<Value>("users", &format!("/internal/users/{user_id}"))
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Err(ApiError::not_found("no such user")),
            Err(e) => return Err(e.into()),
        }
        let subject = Subject::User(user_id.to_owned());
        for _ in 0..5 {
            let mut tx = self.db.begin_write().await.map_err(db_err)?;
            let sub = storage::subscription_of(&mut tx, "user", user_id)
                .await
                .map_err(db_err)?;
            let seen = sub.as_ref().map(|s| s.updated_at);
            let mut row = sub.unwrap_or_else(|| SubscriptionRow {
                id: uuid::Uuid::now_v7().to_string(),
                subject_kind: "user".to_owned(),
                subject_id: user_id.to_owned(),
                user_id: user_id.to_owned(),
                plan: plan.name.clone(),
                cycle: Cycle::Monthly.as_str().to_owned(),
                state: State::Pending.as_str().to_owned(),
                anchor_at: now,
                period_start: now,
                period_end: req.until,
                cancel_at_period_end: 1,
                scheduled_plan: None,
                scheduled_cycle: None,
                created_at: now,
                updated_at: now,
            });
            row.plan = plan.name.clone();
            row.state = State::Active.as_str().to_owned();
            row.anchor_at = now;
            row.period_start = now;
            row.period_end = req.until;
            row.cancel_at_period_end = 1;
            row.scheduled_plan = None;
            row.scheduled_cycle = None;
            let written = match seen {
                Some(seen) => {
                    row.updated_at = now.max(seen + 1);
                    storage::update_subscription(&mut tx, &row, seen)
                        .await
                        .map_err(db_err)?
                }
                None => storage::insert_subscription(&mut tx, &row)
                    .await
                    .map_err(db_err)?,
            };
            if !written {
                continue;
            }
            let audit = ChangeRow {
                id: uuid::Uuid::now_v7().to_string(),
                subject_kind: "user".to_owned(),
                subject_id: user_id.to_owned(),
                user_id: admin.user_id.clone(),
                kind: "grant".to_owned(),
                plan: plan.name.clone(),
                cycle: row.cycle.clone(),
                from_plan: None,
                credit: 0,
                credit_detail: None,
                lines: "[]".to_owned(),
                status: "applied".to_owned(),
                idem_key: None,
                request_hash: None,
                renewal_key: None,
                invoice_id: None,
                invoice_number: None,
                invoice_total: None,
                answer: None,
                applied_at: Some(now),
                created_at: now,
                updated_at: now,
                period_start: Some(now),
            };
            storage::insert_change(&mut tx, &audit)
                .await
                .map_err(db_err)?;
            let mut data = self.event_data(&row, State::Active);
            data["granted_by"] = json!(admin.user_id);
            data["change_id"] = json!(audit.id);
            self.outbox
                .enqueue(&mut tx, "subscription.activated", &data, now)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            self.outbox.notify();
            tracing::info!(user = %user_id, plan = %plan.name, until = req.until, admin = %admin.user_id, "plan granted");
            return self.me(&subject).await;
        }
        Err(ApiError::conflict(
            "subscription_busy",
            "the subscription is being changed; retry shortly",
        )
        .with_retry_after(1))
    }

    /// Changes the subject's subscription with `f` (which refuses with an
    /// error or edits the row), retried when another writer changed it
    /// meanwhile; the subscription as it is then.
    async fn edit(
        &self,
        subject: &Subject,
        mut f: impl FnMut(&mut SubscriptionRow, State) -> Api<()>,
    ) -> Api<SubscriptionView> {
        for _ in 0..5 {
            let mut tx = self.db.begin_write().await.map_err(db_err)?;
            let Some(mut row) = storage::subscription_of(&mut tx, subject.kind(), subject.id())
                .await
                .map_err(db_err)?
            else {
                return Err(nothing_paid());
            };
            let state = State::parse(&row.state)
                .ok_or_else(|| ApiError::internal(&format!("unknown state {}", row.state)))?;
            if !state.grants_tier() {
                return Err(nothing_paid());
            }
            let seen = row.updated_at;
            f(&mut row, state)?;
            row.updated_at = self.clock.now_ms().max(seen + 1);
            if storage::update_subscription(&mut tx, &row, seen)
                .await
                .map_err(db_err)?
            {
                tx.commit().await.map_err(db_err)?;
                return self.me(subject).await;
            }
        }
        Err(ApiError::conflict(
            "subscription_busy",
            "the subscription is being changed; retry shortly",
        )
        .with_retry_after(1))
    }

    /// Schedules a lower paid plan for the period's end (replacing a
    /// cancellation or an earlier downgrade).
    pub async fn downgrade(
        &self,
        subject: &Subject,
        req: &DowngradeRequest,
    ) -> Api<SubscriptionView> {
        let Some((rank, plan)) = self.config.plan(&req.plan) else {
            return Err(ApiError::validation(vec![FieldError::new(
                "plan",
                "not a configured plan",
            )]));
        };
        if rank == 0 {
            return Err(ApiError::validation(vec![FieldError::new(
                "plan",
                "to end on FREE, POST /api/subscriptions/cancel",
            )]));
        }
        let name = plan.name.clone();
        self.edit(subject, |row, _| {
            let current = self.config.plan(&row.plan).map_or(0, |(r, _)| r);
            let cycle = req
                .cycle
                .or_else(|| Cycle::parse(&row.cycle))
                .unwrap_or(Cycle::Monthly);
            let shorter =
                rank == current && row.cycle == Cycle::Yearly.as_str() && cycle == Cycle::Monthly;
            if rank > current || (rank == current && !shorter) {
                return Err(ApiError::conflict(
                    "not_a_downgrade",
                    format!("{name} is not below the plan in force; an upgrade is a checkout"),
                ));
            }
            row.scheduled_plan = Some(name.clone());
            row.scheduled_cycle = Some(cycle.as_str().to_owned());
            row.cancel_at_period_end = 0;
            Ok(())
        })
        .await
    }

    /// Ends the subscription at the period's end (FREE from then on).
    pub async fn cancel(&self, subject: &Subject) -> Api<SubscriptionView> {
        self.edit(subject, |row, _| {
            row.cancel_at_period_end = 1;
            row.scheduled_plan = None;
            row.scheduled_cycle = None;
            Ok(())
        })
        .await
    }

    /// Undoes a cancellation or a scheduled downgrade before the period
    /// ends.
    pub async fn resume(&self, subject: &Subject) -> Api<SubscriptionView> {
        self.edit(subject, |row, _| {
            if row.cancel_at_period_end == 0 && row.scheduled_plan.is_none() {
                return Err(ApiError::conflict(
                    "nothing_to_resume",
                    "the subscription is neither canceled nor scheduled to change",
                ));
            }
            row.cancel_at_period_end = 0;
            row.scheduled_plan = None;
            row.scheduled_cycle = None;
            Ok(())
        })
        .await
    }

    /// `invoice.paid`: the change it bills is applied (once; a
    /// redelivery or a second event for it changes nothing).
    pub async fn invoice_paid(
        &self,
        tx: &mut sqlx::AnyConnection,
        event: &Event,
    ) -> Result<Applied, ApiError> {
        let d = &event.data;
        let reference = &d["reference"];
        if reference["kind"] != "plan_change" && reference["kind"] != "renewal" {
            // Another invoice (a manual one): not ours to act on.
            return Ok(Applied::Stale);
        }
        let (Some(invoice_id), Some(change_id)) =
            (d["invoice_id"].as_str(), reference["id"].as_str())
        else {
            return Ok(Applied::rejected(
                "invalid_event",
                "invoice.paid carries invoice_id and reference.id",
            ));
        };
        let Some(ch) = storage::change_of_invoice(tx, invoice_id, change_id).await? else {
            return Ok(Applied::rejected(
                "unknown_change",
                format!("no change {change_id} for invoice {invoice_id}"),
            ));
        };
        if ch.status == "applied" || ch.status == "unapplied" {
            return Ok(Applied::Stale);
        }
        let now = self.clock.now_ms();
        let paid_at = d["paid_at"].as_i64().unwrap_or(event.occurred_at).min(now);
        let Some(((rank, _), cycle)) = self.config.plan(&ch.plan).zip(Cycle::parse(&ch.cycle))
        else {
            return Ok(Applied::rejected(
                "unknown_plan",
                format!("plan {} {} is not configured", ch.plan, ch.cycle),
            ));
        };
        let sub = storage::subscription_of(tx, &ch.subject_kind, &ch.subject_id).await?;
        if ch.kind == "checkout" && rank < self.granted_rank(sub.as_ref()) {
            // An older checkout paid after a higher plan took effect: the
            // subject keeps the higher plan; this payment is left for a
            // refund (logged, and `unapplied` on the change).
            storage::mark_unapplied(tx, &ch.id, now).await?;
            tracing::warn!(change = %ch.id, invoice = %invoice_id, plan = %ch.plan,
                "a checkout was paid after a higher plan took effect: refund it");
            return Ok(Applied::Applied);
        }
        let from_payment =
            periods::nth(&self.calendar, paid_at, cycle, 0).map_err(|e| ApiError::internal(&e))?;
        // A renewal paid in time (before the period it pays, or in the
        // grace after it began) extends the subscription from where it
        // ends; a checkout, or a renewal paid once the subscription ended
        // (canceled or expired), starts a full period at the payment.
        let renewal_in_time = ch.kind == "renewal"
            && sub.as_ref().is_some_and(|s| {
                State::parse(&s.state).is_some_and(State::grants_tier)
                    && Some(s.period_end) == ch.period_start
            });
        if ch.kind == "renewal"
            && sub.as_ref().is_some_and(|s| {
                ch.period_start.is_some_and(|p| s.period_end > p)
                    && State::parse(&s.state).is_some_and(State::grants_tier)
            })
        {
            // The subscription moved past the period it pays (an upgrade
            // paid meanwhile started a new one): left for a refund.
            storage::mark_unapplied(tx, &ch.id, now).await?;
            tracing::warn!(change = %ch.id, invoice = %invoice_id,
                "a renewal was paid for a period the subscription moved past: refund it");
            return Ok(Applied::Applied);
        }
        let (period, anchor) = match (&sub, renewal_in_time) {
            (Some(s), true) => {
                let p = self.next_period(s, cycle)?;
                let anchor = if s.cycle == ch.cycle {
                    s.anchor_at
                } else {
                    p.start
                };
                (p, anchor)
            }
            _ => (from_payment, paid_at),
        };
        let (mut row, seen) = match sub {
            Some(s) => {
                let seen = s.updated_at;
                (s, Some(seen))
            }
            None => (
                SubscriptionRow {
                    id: uuid::Uuid::now_v7().to_string(),
                    subject_kind: ch.subject_kind.clone(),
                    subject_id: ch.subject_id.clone(),
                    user_id: ch.user_id.clone(),
                    plan: ch.plan.clone(),
                    cycle: ch.cycle.clone(),
                    state: State::Pending.as_str().to_owned(),
                    anchor_at: anchor,
                    period_start: period.start,
                    period_end: period.end,
                    cancel_at_period_end: 0,
                    scheduled_plan: None,
                    scheduled_cycle: None,
                    created_at: now,
                    updated_at: now,
                },
                None,
            ),
        };
        let from = State::parse(&row.state).unwrap_or(State::Pending);
        let to = state::step(from, Input::Paid).unwrap_or(State::Active);
        row.user_id = ch.user_id.clone();
        row.plan = ch.plan.clone();
        row.cycle = ch.cycle.clone();
        row.state = to.as_str().to_owned();
        row.anchor_at = anchor;
        row.period_start = period.start;
        row.period_end = period.end;
        // A paid change replaces whatever was scheduled for the old period.
        row.cancel_at_period_end = 0;
        row.scheduled_plan = None;
        row.scheduled_cycle = None;
        let written = match seen {
            Some(seen) => {
                row.updated_at = now.max(seen + 1);
                storage::update_subscription(tx, &row, seen).await?
            }
            None => storage::insert_subscription(tx, &row).await?,
        };
        if !written || !storage::mark_applied(tx, &ch.id, now).await? {
            // Someone else moved it meanwhile: the event is retried.
            return Err(ApiError::conflict(
                "subscription_busy",
                "the subscription changed meanwhile; retried",
            ));
        }
        if !renewal_in_time {
            // Periods restart from this payment: a renewal waiting for the
            // old period's successor will not be needed (its invoice is
            // voided by the scheduler).
            storage::supersede_renewals(tx, &ch.subject_kind, &ch.subject_id, &ch.id, now).await?;
        }
        // A renewal in time is `renewed` (its tier may change with a
        // scheduled downgrade); anything else starts the plan anew.
        let kind = if renewal_in_time {
            "subscription.renewed"
        } else {
            "subscription.activated"
        };
        let mut data = self.event_data(&row, to);
        data["change_id"] = json!(ch.id);
        data["invoice_id"] = json!(invoice_id);
        self.outbox.enqueue(tx, kind, &data, now).await?;
        tracing::info!(subscription = %row.id, plan = %row.plan, from = from.as_str(), event = kind,
            "subscription paid");
        Ok(Applied::Applied)
    }
}

fn nothing_paid() -> ApiError {
    ApiError::conflict(
        "no_paid_subscription",
        "the subject has no paid plan in force (check out first)",
    )
}
