// The on-disk layout of Docker's fuse-overlayfs graphdriver (moby 20.10), so a data root written
// by dockerd loads unchanged and one written by layerd can be handed back to dockerd:
//
//   HOME/                      0701
//   HOME/l/                    0701
//   HOME/l/LINKID           -> ../ID/diff        (relative symlink, 26-char base32 link id)
//   HOME/ID/                   0701
//   HOME/ID/diff/              0755              the layer's files (upperdir when mounted rw)
//   HOME/ID/work/              0701              only for layers with a parent
//   HOME/ID/merged/            0700              mountpoint, made by the driver at mount time
//   HOME/ID/link               0644 (umask)      the link id, no newline
//   HOME/ID/lower              0666 (umask)      "l/PARENTLINK:l/GRANDPARENTLINK:..." nearest first
//   HOME/ID/committed          0600, empty       written on a PARENT when a child is created:
//                                                its later mounts are read-only (no upperdir)
//
// What layerd adds, invisible to dockerd: creation happens in a staging directory beside the
// layer (HOME/.layerd-staging-*) and is renamed into place, and removal renames the layer to
// HOME/.layerd-trash-* before deleting it, so a crash never leaves a half-made or half-removed
// layer under a valid id. repair() clears those leftovers at start.
//
// All operations run on the loop: single operations are ring ops, recursive walks go through
// core::offload. Errors are layerd::Error with the errno and the id in the message.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "layerd/core/task.hpp"
#include "layerd/sys/fd.hpp"

namespace layerd::store {

constexpr std::size_t kMaxDepth = 128;      // most lowers a layer may have (the seed's maxDepth)
constexpr std::size_t kLinkIdLength = 26;   // the seed's idLength
// Layer ids longer than this are refused: a staging name (prefix + id + random suffix) must
// still fit in NAME_MAX (255).
constexpr std::size_t kMaxIdLength = 200;

// Names in HOME that are not layers. Ids that are, or start with, one of these are refused.
inline constexpr std::string_view kLinkDirName = "l";
inline constexpr std::string_view kStagingPrefix = ".layerd-staging-";
inline constexpr std::string_view kTrashPrefix = ".layerd-trash-";

inline constexpr std::string_view kDiffDirName = "diff";
inline constexpr std::string_view kWorkDirName = "work";
inline constexpr std::string_view kMergedDirName = "merged";
inline constexpr std::string_view kLinkFileName = "link";
inline constexpr std::string_view kLowerFileName = "lower";
inline constexpr std::string_view kCommittedFileName = "committed";

// Throws layerd::Error(EINVAL, "invalid layer id \"...\": <reason>") unless `id` can name a
// directory in HOME without escaping it or colliding with the layout's own names.
void validate_id(std::string_view id);
// True when validate_id(id) would not throw.
[[nodiscard]] bool is_valid_id(std::string_view id) noexcept;

// A fresh link id: base32 (RFC 4648 alphabet, uppercase) of random bytes, first 26 characters,
// exactly like the seed's generateID.
std::string new_link_id();
// True for a string that can be a link id read from disk: non-empty, no '/', ':' or NUL, not
// "." or "..". (Not restricted to base32: ids written by other tools still load.)
[[nodiscard]] bool is_valid_link_id(std::string_view link_id) noexcept;

struct LayerRecord {
  std::string id;
  std::string link_id;              // from HOME/ID/link ("" if the file is missing)
  std::vector<std::string> lowers;  // entries of HOME/ID/lower as written ("l/ABC...")
  bool committed = false;           // HOME/ID/committed exists
  bool has_work = false;            // HOME/ID/work exists

  [[nodiscard]] bool has_parent() const noexcept { return !lowers.empty(); }
};

class Store {
 public:
  // Remembers the path (made absolute against the current directory, trailing '/' dropped);
  // nothing is touched until open().
  explicit Store(std::string home);
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // mkdir -p HOME (new components 0701) and HOME/l (0701, as the seed), then opens an
  // O_PATH|O_DIRECTORY fd of HOME used as the base of every later operation.
  core::Task<void> open();

  [[nodiscard]] const std::string& home() const noexcept { return home_; }
  [[nodiscard]] int home_fd() const noexcept { return home_fd_.get(); }

  // Absolute paths (no I/O, no validation).
  [[nodiscard]] std::string layer_dir(std::string_view id) const;   // HOME/ID
  [[nodiscard]] std::string diff_dir(std::string_view id) const;    // HOME/ID/diff
  [[nodiscard]] std::string work_dir(std::string_view id) const;    // HOME/ID/work
  [[nodiscard]] std::string merged_dir(std::string_view id) const;  // HOME/ID/merged
  // Absolute lower directories for a mount, as the seed passes them: HOME/l/LINKID for each
  // entry of record.lowers (fuse-overlayfs resolves the symlinks).
  [[nodiscard]] std::vector<std::string> lower_paths(const LayerRecord& record) const;

  // True when HOME/ID is a directory. Invalid ids are simply not there (false).
  core::Task<bool> exists(std::string_view id);

  // Reads HOME/ID/{link,lower,committed,work}. Throws ENOENT "layer ID does not exist".
  core::Task<LayerRecord> load(std::string_view id);

  // The id of the layer whose diff a link id points to (readlink of HOME/l/LINKID, which must
  // be "../ID/diff"); nullopt when the link is missing or points elsewhere. With
  // record.lowers[0] this is a layer's parent (the seed's isParent).
  core::Task<std::optional<std::string>> resolve_link(std::string_view link_id);

  // Atomic create: builds HOME/.layerd-staging-create-ID-RANDOM/{diff,work?,link,lower?}, makes
  // the l/LINKID symlink, renames the staging dir to HOME/ID (RENAME_NOREPLACE), then marks the
  // parent committed (as the seed does). Any failure removes what it made. Errors: invalid id
  // (EINVAL), duplicate (EEXIST "layer ID already exists"), missing parent (ENOENT "parent
  // layer P does not exist"), depth > 128 (EINVAL "max depth exceeded"). `parent` may be "".
  core::Task<LayerRecord> create(std::string_view id, std::string_view parent);

  // Creates HOME/ID/committed (empty, 0600), as the seed does on a parent when a child is
  // created. Idempotent.
  core::Task<void> mark_committed(std::string_view id);

  // Renames HOME/ID to a trash name (the id disappears atomically), unlinks l/LINKID if it
  // points at this layer, then deletes the trash tree on the offload pool (never following
  // symlinks, making read-only directories writable, refusing to descend into a mount: EBUSY).
  // Throws ENOENT "layer ID does not exist" when there is nothing to remove (the seed's Remove
  // returns success then: the driver decides). A layer whose merged/ is still a mount point
  // (alive or dead) is refused with EBUSY before anything changes: unmount first.
  core::Task<void> remove(std::string_view id);

  // Layer ids (directories of HOME other than l/, staging and trash), sorted.
  core::Task<std::vector<std::string>> list();

  // Crash repair, to run at start before any other operation: removes staging and trash
  // leftovers and l/ symlinks whose target is gone, and writes `committed` on parents of
  // existing layers where a crash between create's rename and the parent's mark left it out.
  struct RepairReport {
    std::vector<std::string> removed;  // names relative to HOME ("l/ABC", ".layerd-trash-...")
    std::vector<std::string> fixed;    // layer ids that were marked committed
  };
  core::Task<RepairReport> repair();

  // Staging directory for ApplyDiff: HOME/.layerd-staging-apply-ID-RANDOM, created empty
  // (0755, the mode of diff/). Returns its absolute path. The layer must exist.
  core::Task<std::string> make_staging_dir(std::string_view id);
  // Puts a fully applied staging tree in place of HOME/ID/diff with one RENAME_EXCHANGE (diff/
  // never goes missing, not even across a crash), then deletes the old diff tree. `staging_dir`
  // must come from make_staging_dir(id).
  core::Task<void> replace_diff(std::string_view id, std::string_view staging_dir);
  // Deletes a staging directory that will not be used (a failed apply).
  core::Task<void> discard_staging_dir(std::string_view staging_dir);

 private:
  std::string staging_name_for(std::string_view staging_dir, std::string_view id) const;
  core::Task<void> make_dir(std::string rel, unsigned mode, std::string context);
  core::Task<void> require_layer_dir(const std::string& id);
  core::Task<void> delete_tree(std::string name, std::string context);
  core::Task<void> undo_create(std::string staging, std::string link_path, bool renamed,
                               std::string id);

  std::string home_;
  sys::UniqueFd home_fd_;
  // The process umask, read once at open(): directories whose mode it would narrow get an
  // explicit chmod, so modes are exactly the seed's (it chmods too) whatever the umask.
  unsigned umask_ = 022;
};

}  // namespace layerd::store
