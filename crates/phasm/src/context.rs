//! The data an instance carries from step to step: a JSON object (Fantasm's `FSMContext`,
//! as plain data). The ground floor: every layer names it, and it names nothing of phasm.

/// An instance's data: a JSON object.
pub type Context = serde_json::Map<String, serde_json::Value>;
