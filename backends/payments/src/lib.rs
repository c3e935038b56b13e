//! The payments service (port 8023, issue 18), first part: what every
//! other part stands on, with no I/O.
//!
//! - [`midtrans`]: the Midtrans contract as code (external-apis.md §1):
//!   the `Authorization` header, the notification signature and its
//!   constant-time check, `order_id` from an invoice number and an
//!   attempt, amounts as Midtrans writes them, `transaction_status`.
//! - [`state`]: our payment state machine over Midtrans's statuses:
//!   monotonic, duplicates and late or backwards notifications are no-ops,
//!   terminal states stay terminal, a fraud challenge waits, and the
//!   settlement → deny reversal of Permata VA and Mandiri bill is kept.
//!
//! The service itself (routes, the client, webhooks, the janitor, the
//! sandbox) builds on these in the next steps of issue 18.

pub mod midtrans;
pub mod state;
