//! Just enough of a BTF reader to find member offsets of kernel structs in
//! `/sys/kernel/btf/vmlinux` (aya's parser keeps members private). Used to read `struct request`
//! from the BTF block tracepoint without CO-RE: userspace resolves the offsets on this kernel
//! and hands them to the program in a read-only global.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

/// A struct member: byte offset and size of its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub size: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// STRUCT/UNION members: (name offset, type id, bit offset).
    members: Vec<(u32, u32, u32)>,
}

/// The parsed type section of a BTF blob.
#[derive(Debug)]
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

impl Btf {
    /// Parses a little-endian BTF blob (the kernel's is).
    pub fn parse(b: &[u8]) -> Option<Btf> {
        if u16_at(b, 0)? != MAGIC {
            return None;
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let type_off = u32_at(b, 8)? as usize;
        let type_len = u32_at(b, 12)? as usize;
        let str_off = u32_at(b, 16)? as usize;
        let str_len = u32_at(b, 20)? as usize;
        let tsec = b.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
        let strings = b.get(hdr_len + str_off..hdr_len + str_off + str_len)?.to_vec();
        // Type id 0 is void.
        let mut types =
            vec![Type { name: 0, kind: 0, kind_flag: false, size_or_type: 0, members: Vec::new() }];
        let mut o = 0;
        while o < tsec.len() {
            let name = u32_at(tsec, o)?;
            let info = u32_at(tsec, o + 4)?;
            let size_or_type = u32_at(tsec, o + 8)?;
            o += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let mut members = Vec::new();
            o += match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = o + i * 12;
                        members.push((u32_at(tsec, m)?, u32_at(tsec, m + 4)?, u32_at(tsec, m + 8)?));
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                _ => 0,
            };
            types.push(Type { name, kind, kind_flag: info >> 31 == 1, size_or_type, members });
        }
        let mut btf = Btf { types, strings, structs: HashMap::new() };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let n = btf.str(t.name).to_string();
                btf.structs.entry(n).or_insert(id as u32);
            }
        }
        Some(btf)
    }

    /// Reads and parses the running kernel's BTF.
    pub fn from_sys_fs() -> Option<Btf> {
        Btf::parse(&std::fs::read("/sys/kernel/btf/vmlinux").ok()?)
    }

    fn str(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Size in bytes of a type, through typedefs and qualifiers.
    fn size_of(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => return Some(t.size_or_type),
                KIND_PTR => return Some(8),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return None,
            }
        }
        None
    }

    /// Offset and size of member `name` of the struct or union `id`, looking into anonymous
    /// struct/union members.
    fn find(&self, id: u32, name: &str) -> Option<Member> {
        let t = self.types.get(id as usize)?;
        for &(mname, mtype, moff) in &t.members {
            let bits = if t.kind_flag { moff & 0xff_ffff } else { moff };
            if bits % 8 != 0 {
                continue; // bitfields are not readable this way
            }
            if mname == 0 {
                let mut inner = mtype;
                while let Some(it) = self.types.get(inner as usize) {
                    if matches!(it.kind, KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST) {
                        inner = it.size_or_type;
                    } else {
                        break;
                    }
                }
                if let Some(m) = self.find(inner, name) {
                    return Some(Member { offset: bits / 8 + m.offset, size: m.size });
                }
            } else if self.str(mname) == name {
                return Some(Member { offset: bits / 8, size: self.size_of(mtype)? });
            }
        }
        None
    }

    /// Offset and size of `strukt.member` (e.g. `request`, `__data_len`).
    pub fn member(&self, strukt: &str, member: &str) -> Option<Member> {
        self.find(*self.structs.get(strukt)?, member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, not even close").is_none());
        assert!(Btf::parse(&[]).is_none());
    }

    #[test]
    fn finds_members_of_this_kernel() {
        // Every kernel this runs on with eBPF has BTF; without it there is nothing to check.
        let Some(btf) = Btf::from_sys_fs() else {
            eprintln!("skipped: btf::finds_members_of_this_kernel: no /sys/kernel/btf/vmlinux");
            return;
        };
        let len = btf.member("request", "__data_len").expect("request.__data_len");
        assert_eq!(len.size, 4);
        let q = btf.member("request", "q").expect("request.q");
        assert_eq!(q.size, 8);
        assert!(btf.member("request", "no_such_member").is_none());
        assert!(btf.member("no_such_struct", "q").is_none());
        // task_struct.pid sits behind many members and anonymous unions on every kernel.
        assert_eq!(btf.member("task_struct", "pid").expect("pid").size, 4);
    }
}
