// Diff I/O: tar streams into layers (apply_tar) and out of them (export_diff, export_changes),
// and the change lists Docker's Changes/DiffSize report (upper_changes, compare_trees,
// upper_diff_size). See DESIGN.md, "Diff I/O", and issue 5.
//
// Every function here runs on the loop thread and keeps it free: libarchive decodes on a small
// fiber stack that switches back to the loop whenever it needs input, files are created and
// written through the ring, and directory walks run on the offload pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "layerd/archive/stream.hpp"
#include "layerd/core/task.hpp"

namespace layerd::archive {

// One line of a uid or gid map (as in /proc/PID/uid_map): container ids
// [container_id, container_id + size) are host ids [host_id, host_id + size).
struct IdMapping {
  std::uint32_t container_id = 0, host_id = 0, size = 0;
};

struct ApplyOptions {
  std::vector<IdMapping> uid_maps, gid_maps;  // empty: identity
  std::uint64_t max_entries = 10'000'000;
  std::uint64_t max_bytes = 1ULL << 40;  // sum of declared regular-file sizes
  std::size_t max_name_length = 4096;    // of a cleaned path (and of a link target)
  // Device nodes need CAP_MKNOD. true: create them, and fail with a clear error when refused.
  // false: skip them silently (as Docker does in a user namespace). Fifos are always created.
  bool allow_device_nodes = true;
};

struct ApplyResult {
  // What the seed's ApplyDiff answers as Size (the size of the applied directory as moby's
  // directory.Size counts it): regular-file bytes (a hardlinked file once) plus symlink lengths.
  std::uint64_t bytes_applied = 0;
  std::uint64_t entries = 0;  // tar entries applied (the root entry "./" and skipped ones excluded)
};

// Decodes `tar` (uncompressed, or any compression libarchive reads) and writes it into the empty
// directory `target_dirfd` (a staging directory: the caller renames it into place on success and
// removes it on failure). Throws layerd::Error naming the entry on hostile or broken input:
// paths escaping the target (after Docker's cleaning: a leading "/" is stripped, "a/../b" is
// "b", "../x" is refused), parents that are symlinks or not directories, hardlinks to missing
// targets or outside, duplicate non-directory entries, names over the limits, truncated data,
// negative or oversized header values, limits exceeded, corrupt compression.
// AUFS whiteouts (.wh.NAME, .wh..wh..opq) are written as the plain files they are in the tar.
core::Task<ApplyResult> apply_tar(ByteSource& tar, int target_dirfd, const ApplyOptions& options);

// Streams a tar of the upper directory `diff_dirfd` to `out` (what Docker's overlay Diff sends):
// depth-first, names sorted bytewise in each directory, hardlinks preserved, mtimes in whole
// seconds, owners, modes, xattrs (except overlay-internal ones). Whiteouts leave in AUFS form
// whatever their form on disk: a 0/0 character device NAME becomes a regular file .wh.NAME; a
// directory with an opaque xattr (trusted.overlay.opaque, user.overlay.opaque,
// user.fuseoverlayfs.opaque = "y") is followed by a regular file .wh..wh..opq.
core::Task<void> export_diff(int diff_dirfd, ByteSink& out);

// Changes of a layer from its upper directory only. `lower_dirfds` are the diff directories of
// the layer's lowers, nearest first (AUFS or overlay whiteouts and opaque markers in them are
// honoured); they are used for existence checks and for listing what an opaque directory hides.
// Gives the same result as compare_trees() of the merged views: moby's ChangesDirs semantics
// (a directory with changes inside is reported modified before them; a deleted directory is
// reported alone). Order: depth-first, names sorted bytewise within a directory.
core::Task<std::vector<Change>> upper_changes(int diff_dirfd, const std::vector<int>& lower_dirfds);

// What Diff would carry, as moby's ChangesSize counts it: the lstat size of every non-directory
// in the upper directory (a hardlinked inode once; whiteouts are empty).
core::Task<std::uint64_t> upper_diff_size(int diff_dirfd);

// Naive fallback: compares two full trees (a layer's merged view against its parent's merged
// view) as moby's ChangesDirs does. `old_root_fd` may be -1 (no parent: everything is added).
core::Task<std::vector<Change>> compare_trees(int new_root_fd, int old_root_fd);

// Streams a tar of `changes` taken from the tree `root_fd` (moby's ExportChanges): changes sorted
// by path; deletions become .wh.NAME entries; a directory entry carries the directory alone.
core::Task<void> export_changes(int root_fd, const std::vector<Change>& changes, ByteSink& out);

}  // namespace layerd::archive
