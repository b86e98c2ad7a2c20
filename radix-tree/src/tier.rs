/// A storage tier. The discriminants are indices into per-tier arrays and
/// order the tiers from fastest to slowest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Device = 0,
    Host = 1,
    Disk = 2,
}

/// Number of tiers.
pub const TIERS: usize = 3;

impl Tier {
    pub const ALL: [Tier; TIERS] = [Tier::Device, Tier::Host, Tier::Disk];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }

    /// The tier a demoted block moves to, or `None` for the bottom tier.
    pub fn below(self) -> Option<Tier> {
        match self {
            Tier::Device => Some(Tier::Host),
            Tier::Host => Some(Tier::Disk),
            Tier::Disk => None,
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tier's name for one block: its slot index there. The index stores it
/// and hands it back; it never interprets it. `u32::MAX` is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    pub(crate) const NONE_RAW: u32 = u32::MAX;
}

/// Where one page's copies are: a block id per tier that holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageLocation {
    raw: [u32; TIERS],
}

impl Default for PageLocation {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl PageLocation {
    pub const EMPTY: PageLocation = PageLocation {
        raw: [BlockId::NONE_RAW; TIERS],
    };

    pub fn get(&self, tier: Tier) -> Option<BlockId> {
        let raw = self.raw[tier.index()];
        (raw != BlockId::NONE_RAW).then_some(BlockId(raw))
    }

    pub fn has(&self, tier: Tier) -> bool {
        self.raw[tier.index()] != BlockId::NONE_RAW
    }

    /// The fastest tier holding a copy.
    pub fn fastest(&self) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| self.has(*t))
    }

    /// True when the page's one copy is on `tier`.
    pub fn only_on(&self, tier: Tier) -> bool {
        Tier::ALL.into_iter().all(|t| self.has(t) == (t == tier))
    }

    pub fn is_empty(&self) -> bool {
        self.fastest().is_none()
    }

    pub fn copies(&self) -> impl Iterator<Item = (Tier, BlockId)> + '_ {
        Tier::ALL
            .into_iter()
            .filter_map(|t| self.get(t).map(|b| (t, b)))
    }

    pub(crate) fn set(&mut self, tier: Tier, block: Option<BlockId>) {
        self.raw[tier.index()] = block.map_or(BlockId::NONE_RAW, |b| b.0);
    }
}
