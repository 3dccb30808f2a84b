//! The variables a policy expression may read, sets of them, and the worst-case size of each
//! one's value (what the cost estimate multiplies by).

/// The variables a CEL expression may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Var {
    /// The verified token's claims.
    Claims,
    /// The HTTP upgrade request: `ip`, `scheme`, `origin`, `path`, `query`, `headers`.
    Request,
    /// The connection: `id`, `user`, `ip`, `instance`, `connected_at`.
    Conn,
    /// The client message being decided.
    Message,
    /// The current time, a timestamp.
    Now,
}

impl Var {
    /// Every variable, in the order they are listed in messages.
    pub const ALL: [Var; 5] = [Var::Claims, Var::Request, Var::Conn, Var::Message, Var::Now];

    /// The name CEL code uses.
    pub fn name(self) -> &'static str {
        match self {
            Var::Claims => "claims",
            Var::Request => "request",
            Var::Conn => "conn",
            Var::Message => "message",
            Var::Now => "now",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of variables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VarSet(u8);

impl VarSet {
    /// What a constant reads: a limit that reads nothing is evaluated at load.
    pub const NONE: VarSet = VarSet(0);

    /// A set of the given variables.
    pub const fn of(vars: &[Var]) -> VarSet {
        let mut bits = 0u8;
        let mut i = 0;
        while i < vars.len() {
            bits |= 1 << vars[i] as u8;
            i += 1;
        }
        VarSet(bits)
    }

    /// Whether `var` is in the set.
    pub fn contains(self, var: Var) -> bool {
        self.0 & var.bit() != 0
    }

    pub(super) fn insert(&mut self, var: Var) {
        self.0 |= var.bit();
    }

    pub(super) fn names(self) -> String {
        let names: Vec<&str> = Var::ALL.iter().filter(|v| self.contains(**v)).map(|v| v.name()).collect();
        if names.is_empty() { "none".into() } else { names.join(", ") }
    }
}

/// Worst-case sizes (bytes) of the values bound to each variable, for the cost estimate.
#[derive(Debug, Clone, Copy)]
pub struct InputSizes {
    /// Claims come from a token, bounded by the request header limit.
    pub claims: u64,
    /// The request's headers, bounded by the request header limit.
    pub request: u64,
    /// The connection's own small record.
    pub conn: u64,
    /// A message, bounded by `messages.max_bytes`.
    pub message: u64,
}

impl InputSizes {
    pub(super) fn of(&self, var: Var) -> u64 {
        match var {
            Var::Claims => self.claims,
            Var::Request => self.request,
            Var::Conn => self.conn,
            Var::Message => self.message,
            Var::Now => 1,
        }
    }
}
