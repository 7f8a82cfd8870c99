// Store: the on-disk layout of Docker's fuse-overlayfs driver, byte for byte, with atomic
// create/remove, the ApplyDiff staging swap and crash repair. Real files in a temp directory.
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/store/store.hpp"
#include "layerd/sys/error.hpp"

namespace fs = std::filesystem;
using namespace layerd;
using layerd::core::Loop;
using layerd::core::Task;
using store::LayerRecord;
using store::Store;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const std::string& data, mode_t mode = 0644) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::write(fd, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  ::close(fd);
}

std::string link_target(const std::string& path) {
  char buf[4096];
  ssize_t n = ::readlink(path.c_str(), buf, sizeof buf);
  return n < 0 ? std::string("<not a symlink>") : std::string(buf, static_cast<std::size_t>(n));
}

mode_t mode_of(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return 0;
  return st.st_mode;
}

bool is_dir(const std::string& path) { return S_ISDIR(mode_of(path)); }
bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

// Every entry below `root`: type, permission bits, and contents (files) or target (symlinks).
std::map<std::string, std::string> snapshot(const std::string& root) {
  std::map<std::string, std::string> out;
  for (auto it = fs::recursive_directory_iterator(root, fs::directory_options::none);
       it != fs::recursive_directory_iterator(); ++it) {
    std::string p = it->path().string();
    std::string rel = p.substr(root.size());
    mode_t m = mode_of(p);
    char perm[16];
    std::snprintf(perm, sizeof perm, "%04o", m & 07777);
    if (S_ISLNK(m)) {
      out[rel] = std::string("link ") + perm + " -> " + link_target(p);
    } else if (S_ISDIR(m)) {
      out[rel] = std::string("dir ") + perm;
    } else {
      out[rel] = std::string("file ") + perm + " " + read_file(p);
    }
  }
  return out;
}

bool is_base32_link_id(const std::string& s) {
  if (s.size() != store::kLinkIdLength) return false;
  for (char c : s)
    if (!((c >= 'A' && c <= 'Z') || (c >= '2' && c <= '7'))) return false;
  return true;
}

// Runs `task` and returns the layerd::Error it threw (errno 0 if none).
template <typename T>
Error expect_error(Loop& loop, Task<T> task) {
  try {
    (void)loop.block_on(std::move(task));
  } catch (const Error& e) {
    return e;
  }
  return Error(0, "no error");
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ::umask(022);
    char tmpl[] = "/tmp/layerd-store-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    tmp_ = tmpl;
    home_ = tmp_ + "/data/fuse-overlayfs";
    store_ = std::make_unique<Store>(home_);
    loop_.block_on(store_->open());
  }
  void TearDown() override {
    store_.reset();
    // Make everything deletable first (tests create read-only directories).
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(tmp_, ec);
         it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (it->is_directory(ec) && !it->is_symlink(ec)) ::chmod(it->path().c_str(), 0700);
    }
    fs::remove_all(tmp_, ec);
  }

  LayerRecord create(const std::string& id, const std::string& parent = "") {
    return loop_.block_on(store_->create(id, parent));
  }
  std::string h(const std::string& rel) const { return home_ + "/" + rel; }

  Loop loop_;
  std::string tmp_;
  std::string home_;
  std::unique_ptr<Store> store_;
};

TEST(StoreIds, LinkIdsAreSeedShaped) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    std::string id = store::new_link_id();
    ASSERT_TRUE(is_base32_link_id(id)) << id;
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 1000u);
}

TEST(StoreIds, ValidateRefusesWhatCannotBeALayerName) {
  const std::vector<std::string> bad = {"",
                                        ".",
                                        "..",
                                        "l",
                                        "a/b",
                                        "/abs",
                                        std::string("nul\0x", 5),
                                        "ctl\x01",
                                        "tab\there",
                                        "del\x7f",
                                        ".layerd-staging-create-x-1",
                                        ".layerd-trash-x-1",
                                        std::string(201, 'a'),
                                        "a:b",
                                        "a,b"};
  for (const auto& id : bad) {
    EXPECT_FALSE(store::is_valid_id(id)) << id;
    try {
      store::validate_id(id);
      ADD_FAILURE() << "accepted " << id;
    } catch (const Error& e) {
      EXPECT_EQ(e.errno_value(), EINVAL);
      EXPECT_EQ(std::string(e.what()).rfind("invalid layer id \"", 0), 0u) << e.what();
    }
  }
  for (const std::string& id :
       {std::string("a"), std::string(64, 'f'), std::string(64, 'e') + "-init", std::string(200, 'x'),
        std::string("l2"), std::string(".hidden"), std::string("sha256-ab")}) {
    EXPECT_NO_THROW(store::validate_id(id)) << id;
  }
}

TEST_F(StoreTest, OpenMakesHomeAndLinkDirLikeTheSeed) {
  EXPECT_TRUE(is_dir(home_));
  EXPECT_EQ(mode_of(home_) & 07777, 0701u);
  EXPECT_TRUE(is_dir(h("l")));
  EXPECT_EQ(mode_of(h("l")) & 07777, 0701u);
  EXPECT_GE(store_->home_fd(), 0);
  EXPECT_EQ(store_->home(), home_);
  EXPECT_EQ(store_->layer_dir("x"), home_ + "/x");
  EXPECT_TRUE(loop_.block_on(store_->list()).empty());
  // Opening again (an existing data root) changes nothing.
  auto before = snapshot(home_);
  Store again(home_ + "/");
  loop_.block_on(again.open());
  EXPECT_EQ(again.home(), home_);
  EXPECT_EQ(snapshot(home_), before);
}

TEST_F(StoreTest, BaseLayerLayoutIsExactlyTheSeeds) {
  LayerRecord rec = create("base");
  EXPECT_EQ(rec.id, "base");
  EXPECT_TRUE(is_base32_link_id(rec.link_id)) << rec.link_id;
  EXPECT_TRUE(rec.lowers.empty());
  EXPECT_FALSE(rec.committed);
  EXPECT_FALSE(rec.has_work);

  std::map<std::string, std::string> expected = {
      {"/l", "dir 0701"},
      {"/l/" + rec.link_id, "link 0777 -> ../base/diff"},
      {"/base", "dir 0701"},
      {"/base/diff", "dir 0755"},
      {"/base/link", "file 0644 " + rec.link_id},
  };
  EXPECT_EQ(snapshot(home_), expected);

  LayerRecord loaded = loop_.block_on(store_->load("base"));
  EXPECT_EQ(loaded.id, "base");
  EXPECT_EQ(loaded.link_id, rec.link_id);
  EXPECT_TRUE(loaded.lowers.empty());
  EXPECT_FALSE(loaded.committed);
  EXPECT_FALSE(loaded.has_work);
  EXPECT_TRUE(loop_.block_on(store_->exists("base")));
  EXPECT_FALSE(loop_.block_on(store_->exists("nope")));
  EXPECT_FALSE(loop_.block_on(store_->exists("l")));
  EXPECT_FALSE(loop_.block_on(store_->exists("../x")));
}

TEST_F(StoreTest, ChainsWriteLowerNearestFirstAndCommitTheParent) {
  LayerRecord base = create("base");
  LayerRecord mid = create("mid", "base");
  LayerRecord top = create("top", "mid");

  EXPECT_EQ(mid.lowers, std::vector<std::string>{"l/" + base.link_id});
  EXPECT_EQ(top.lowers, (std::vector<std::string>{"l/" + mid.link_id, "l/" + base.link_id}));
  EXPECT_TRUE(mid.has_work);

  // Bytes as the seed writes them: no trailing newline, ':' separated, 0666 & ~umask.
  EXPECT_EQ(read_file(h("mid/lower")), "l/" + base.link_id);
  EXPECT_EQ(read_file(h("top/lower")), "l/" + mid.link_id + ":l/" + base.link_id);
  EXPECT_EQ(mode_of(h("top/lower")) & 07777, 0644u);
  EXPECT_EQ(read_file(h("top/link")), top.link_id);
  EXPECT_TRUE(is_dir(h("top/work")));
  EXPECT_EQ(mode_of(h("top/work")) & 07777, 0701u);
  EXPECT_EQ(mode_of(h("top/diff")) & 07777, 0755u);
  EXPECT_EQ(link_target(h("l/" + top.link_id)), "../top/diff");
  EXPECT_FALSE(exists(h("top/merged")));  // made by the driver at mount time

  // `committed` lands on each parent (empty, 0600), not on the leaf.
  EXPECT_TRUE(S_ISREG(mode_of(h("base/committed"))));
  EXPECT_EQ(mode_of(h("base/committed")) & 07777, 0600u);
  EXPECT_EQ(read_file(h("base/committed")), "");
  EXPECT_TRUE(exists(h("mid/committed")));
  EXPECT_FALSE(exists(h("top/committed")));

  LayerRecord loaded = loop_.block_on(store_->load("top"));
  EXPECT_EQ(loaded.lowers, top.lowers);
  EXPECT_EQ(loaded.link_id, top.link_id);
  EXPECT_TRUE(loaded.has_work);
  EXPECT_FALSE(loaded.committed);
  EXPECT_TRUE(loop_.block_on(store_->load("base")).committed);

  EXPECT_EQ(store_->lower_paths(loaded),
            (std::vector<std::string>{home_ + "/l/" + mid.link_id, home_ + "/l/" + base.link_id}));
  auto parent = loop_.block_on(store_->resolve_link(mid.link_id));
  ASSERT_TRUE(parent.has_value());
  EXPECT_EQ(*parent, "mid");
  EXPECT_FALSE(loop_.block_on(store_->resolve_link("NOSUCHLINK")).has_value());
  EXPECT_FALSE(loop_.block_on(store_->resolve_link("../x")).has_value());

  EXPECT_EQ(loop_.block_on(store_->list()), (std::vector<std::string>{"base", "mid", "top"}));
}

TEST_F(StoreTest, Depth128IsAcceptedAnd129Refused) {
  create("layer0");
  for (int i = 1; i <= 128; ++i) create("layer" + std::to_string(i), "layer" + std::to_string(i - 1));
  LayerRecord deepest = loop_.block_on(store_->load("layer128"));
  EXPECT_EQ(deepest.lowers.size(), 128u);
  auto before = snapshot(home_);
  Error e = expect_error(loop_, store_->create("layer129", "layer128"));
  EXPECT_EQ(e.errno_value(), EINVAL);
  EXPECT_NE(std::string(e.what()).find("max depth exceeded"), std::string::npos) << e.what();
  EXPECT_EQ(snapshot(home_), before);
}

TEST_F(StoreTest, InvalidIdsLeaveHomeUnchanged) {
  create("base");
  auto before = snapshot(home_);
  for (const std::string& id : {std::string(""), std::string(".."), std::string("l"),
                               std::string("../escape"), std::string("a/b"),
                               std::string(".layerd-trash-x"), std::string(300, 'z'),
                               std::string("bad\nid")}) {
    Error e = expect_error(loop_, store_->create(id, ""));
    EXPECT_EQ(e.errno_value(), EINVAL) << id;
    EXPECT_EQ(snapshot(home_), before) << id;
  }
  Error e = expect_error(loop_, store_->create("good", "../base"));
  EXPECT_EQ(e.errno_value(), EINVAL);
  EXPECT_EQ(expect_error(loop_, store_->load("..")).errno_value(), EINVAL);
  EXPECT_EQ(expect_error(loop_, store_->remove("l")).errno_value(), EINVAL);
  EXPECT_EQ(snapshot(home_), before);
}

TEST_F(StoreTest, DuplicateAndMissingParentLeaveNothingBehind) {
  LayerRecord base = create("base");
  auto before = snapshot(home_);
  Error dup = expect_error(loop_, store_->create("base", ""));
  EXPECT_EQ(dup.errno_value(), EEXIST);
  EXPECT_NE(std::string(dup.what()).find("layer base already exists"), std::string::npos);
  EXPECT_EQ(snapshot(home_), before);

  Error missing = expect_error(loop_, store_->create("child", "ghost"));
  EXPECT_EQ(missing.errno_value(), ENOENT);
  EXPECT_NE(std::string(missing.what()).find("parent layer ghost does not exist"),
            std::string::npos)
      << missing.what();
  EXPECT_EQ(snapshot(home_), before);

  Error load = expect_error(loop_, store_->load("ghost"));
  EXPECT_EQ(load.errno_value(), ENOENT);
  EXPECT_NE(std::string(load.what()).find("layer ghost does not exist"), std::string::npos);
}

TEST_F(StoreTest, FailureBeforeTheRenameRemovesEverything) {
  create("base");
  // l/ replaced by a regular file: the symlink step fails (ENOTDIR), even for root, after the
  // staging directory with diff/, work/ and lower was built.
  fs::rename(h("l"), tmp_ + "/saved-l");
  write_file(h("l"), "not a directory");
  auto before = snapshot(home_);
  Error e = expect_error(loop_, store_->create("child", "base"));
  EXPECT_EQ(e.errno_value(), ENOTDIR) << e.what();
  EXPECT_EQ(snapshot(home_), before);
  EXPECT_FALSE(exists(h("base/committed")));
}

TEST_F(StoreTest, FailureAfterTheRenameRollsTheLayerBack) {
  create("base");
  // `committed` cannot be created on the parent (a directory is in the way): the last step
  // fails after the new layer was renamed into place; it must vanish again, link and all.
  ASSERT_EQ(::mkdir(h("base/committed").c_str(), 0700), 0);
  auto before = snapshot(home_);
  Error e = expect_error(loop_, store_->create("child", "base"));
  EXPECT_EQ(e.errno_value(), EISDIR) << e.what();
  EXPECT_EQ(snapshot(home_), before);
}

TEST_F(StoreTest, RemoveDeletesTheTreeAndLinkWithoutFollowingSymlinks) {
  LayerRecord base = create("base");
  LayerRecord child = create("child", "base");
  // Hostile content: symlinks out of the tree, read-only and mode-0 directories, deep nesting.
  std::string outside = tmp_ + "/outside";
  ASSERT_EQ(::mkdir(outside.c_str(), 0755), 0);
  write_file(outside + "/precious", "keep me");
  std::string diff = h("child/diff");
  ASSERT_EQ(::symlink(outside.c_str(), (diff + "/escape").c_str()), 0);
  ASSERT_EQ(::symlink((outside + "/precious").c_str(), (diff + "/file-escape").c_str()), 0);
  std::string deep = diff;
  for (int i = 0; i < 50; ++i) {
    deep += "/d";
    ASSERT_EQ(::mkdir(deep.c_str(), 0755), 0);
  }
  write_file(deep + "/leaf", "x");
  ASSERT_EQ(::mkdir((diff + "/ro").c_str(), 0755), 0);
  write_file(diff + "/ro/f", "x", 0444);
  ASSERT_EQ(::chmod((diff + "/ro").c_str(), 0555), 0);
  ASSERT_EQ(::mkdir((diff + "/none").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((diff + "/none/sub").c_str(), 0755), 0);
  ASSERT_EQ(::chmod((diff + "/none").c_str(), 0), 0);

  loop_.block_on(store_->remove("child"));
  EXPECT_FALSE(exists(h("child")));
  EXPECT_FALSE(exists(h("l/" + child.link_id)));
  EXPECT_EQ(read_file(outside + "/precious"), "keep me");
  EXPECT_TRUE(exists(h("base/diff")));
  EXPECT_TRUE(exists(h("l/" + base.link_id)));
  EXPECT_EQ(loop_.block_on(store_->list()), std::vector<std::string>{"base"});
  // No trash left.
  for (const auto& ent : fs::directory_iterator(home_))
    EXPECT_EQ(ent.path().filename().string().rfind(".layerd-", 0), std::string::npos);

  Error e = expect_error(loop_, store_->remove("child"));
  EXPECT_EQ(e.errno_value(), ENOENT);
}

TEST_F(StoreTest, RemoveRefusesAMountedLayer) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to mount tmpfs on merged/";
  create("base");
  create("child", "base");
  std::string merged = h("child/merged");
  ASSERT_EQ(::mkdir(merged.c_str(), 0700), 0);
  ASSERT_EQ(::mount("tmpfs", merged.c_str(), "tmpfs", 0, "size=1m"), 0);
  write_file(merged + "/inside", "x");
  auto before = snapshot(home_);
  Error e = expect_error(loop_, store_->remove("child"));
  EXPECT_EQ(e.errno_value(), EBUSY) << e.what();
  EXPECT_EQ(snapshot(home_), before);
  ASSERT_EQ(::umount2(merged.c_str(), 0), 0);
  loop_.block_on(store_->remove("child"));
  EXPECT_FALSE(exists(h("child")));
}

TEST_F(StoreTest, RemoveSparesALinkThatPointsElsewhere) {
  LayerRecord a = create("a");
  LayerRecord b = create("b");
  // A corrupt link file naming another layer's link must not take that link away.
  write_file(h("b/link"), a.link_id);
  loop_.block_on(store_->remove("b"));
  EXPECT_EQ(link_target(h("l/" + a.link_id)), "../a/diff");
  EXPECT_TRUE(exists(h("l/" + b.link_id)));  // dangling now: repair() takes it
  auto report = loop_.block_on(store_->repair());
  EXPECT_EQ(report.removed, std::vector<std::string>{"l/" + b.link_id});
  EXPECT_FALSE(exists(h("l/" + b.link_id)));
}

TEST_F(StoreTest, ListSkipsLayoutAndLeftovers) {
  create("b");
  create("a");
  ASSERT_EQ(::mkdir(h(".layerd-staging-create-c-123").c_str(), 0700), 0);
  ASSERT_EQ(::mkdir(h(".layerd-trash-d-123").c_str(), 0700), 0);
  write_file(h("stray-file"), "");
  EXPECT_EQ(loop_.block_on(store_->list()), (std::vector<std::string>{"a", "b"}));
}

TEST_F(StoreTest, RepairRemovesLeftoversAndDanglingLinksAndRecommitsParents) {
  LayerRecord base = create("base");
  LayerRecord child = create("child", "base");
  auto good = snapshot(home_);

  // A create that died before its rename: staging dir with content plus its dangling link.
  std::string staging = h(".layerd-staging-create-x-0123456789ab");
  ASSERT_EQ(::mkdir(staging.c_str(), 0701), 0);
  ASSERT_EQ(::mkdir((staging + "/diff").c_str(), 0755), 0);
  write_file(staging + "/diff/file", "data");
  ASSERT_EQ(::symlink("../x/diff", h("l/DANGLINGDANGLINGDANGLING22").c_str()), 0);
  // A remove that died after its rename, with a read-only dir inside.
  std::string trash = h(".layerd-trash-y-0123456789ab");
  ASSERT_EQ(::mkdir(trash.c_str(), 0701), 0);
  ASSERT_EQ(::mkdir((trash + "/diff").c_str(), 0555), 0);
  // An abandoned apply staging dir.
  ASSERT_EQ(::mkdir(h(".layerd-staging-apply-base-0123456789ab").c_str(), 0755), 0);
  // A create that died between its rename and marking the parent.
  ASSERT_EQ(::unlink(h("base/committed").c_str()), 0);

  auto report = loop_.block_on(store_->repair());
  std::set<std::string> removed(report.removed.begin(), report.removed.end());
  EXPECT_EQ(removed, (std::set<std::string>{".layerd-staging-create-x-0123456789ab",
                                            ".layerd-trash-y-0123456789ab",
                                            ".layerd-staging-apply-base-0123456789ab",
                                            "l/DANGLINGDANGLINGDANGLING22"}));
  EXPECT_EQ(report.fixed, std::vector<std::string>{"base"});
  EXPECT_EQ(snapshot(home_), good);

  // Idempotent.
  auto again = loop_.block_on(store_->repair());
  EXPECT_TRUE(again.removed.empty());
  EXPECT_TRUE(again.fixed.empty());
}

// A data root laid out by hand exactly as dockerd's fuse-overlayfs driver leaves it (an image
// layer, its init layer and a container layer on top), opened and extended by the store.
TEST_F(StoreTest, DockerWrittenDataRootLoadsUnchanged) {
  std::string root = tmp_ + "/docker/fuse-overlayfs";
  ASSERT_EQ(::mkdir((tmp_ + "/docker").c_str(), 0711), 0);
  ASSERT_EQ(::mkdir(root.c_str(), 0701), 0);
  ASSERT_EQ(::mkdir((root + "/l").c_str(), 0701), 0);
  const std::string img = std::string(64, 'a');
  const std::string init = std::string(64, 'b') + "-init";
  const std::string ctr = std::string(64, 'b');
  const std::string img_link = "QZ7XKAL3VBPOZSJ5IYZVQ2KRYP";
  const std::string init_link = "UDPTOLKQ4ZG4ZB6VPJLB6F3BJM";
  const std::string ctr_link = "C6SLL2TMXWMQPLBQGKC7PVR5TD";
  auto make_layer = [&](const std::string& id, const std::string& link, const std::string& lower,
                        bool committed) {
    std::string dir = root + "/" + id;
    ASSERT_EQ(::mkdir(dir.c_str(), 0701), 0);
    ASSERT_EQ(::mkdir((dir + "/diff").c_str(), 0755), 0);
    write_file(dir + "/link", link, 0644);
    ASSERT_EQ(::symlink(("../" + id + "/diff").c_str(), (root + "/l/" + link).c_str()), 0);
    if (!lower.empty()) {
      ASSERT_EQ(::mkdir((dir + "/work").c_str(), 0701), 0);
      write_file(dir + "/lower", lower, 0644);
    }
    if (committed) write_file(dir + "/committed", "", 0600);
  };
  make_layer(img, img_link, "", true);
  write_file(root + "/" + img + "/diff/hello", "world");
  make_layer(init, init_link, "l/" + img_link, true);
  make_layer(ctr, ctr_link, "l/" + init_link + ":l/" + img_link, false);
  ASSERT_EQ(::mkdir((root + "/" + ctr + "/merged").c_str(), 0700), 0);
  auto before = snapshot(root);

  Store docker(root);
  loop_.block_on(docker.open());
  EXPECT_EQ(loop_.block_on(docker.repair()).removed.size(), 0u);
  EXPECT_EQ(snapshot(root), before);  // open and repair touch nothing of a healthy root

  EXPECT_EQ(loop_.block_on(docker.list()), (std::vector<std::string>{img, ctr, init}));
  LayerRecord r = loop_.block_on(docker.load(ctr));
  EXPECT_EQ(r.link_id, ctr_link);
  EXPECT_EQ(r.lowers, (std::vector<std::string>{"l/" + init_link, "l/" + img_link}));
  EXPECT_FALSE(r.committed);
  EXPECT_TRUE(r.has_work);
  EXPECT_EQ(docker.lower_paths(r)[1], root + "/l/" + img_link);
  EXPECT_EQ(read_file(docker.lower_paths(r)[1] + "/hello"), "world");
  EXPECT_TRUE(loop_.block_on(docker.load(img)).committed);
  EXPECT_EQ(*loop_.block_on(docker.resolve_link(init_link)), init);

  // Building on top writes what dockerd would.
  LayerRecord next = loop_.block_on(docker.create("next", ctr));
  EXPECT_EQ(read_file(root + "/next/lower"), "l/" + ctr_link + ":l/" + init_link + ":l/" + img_link);
  EXPECT_TRUE(exists(root + "/" + ctr + "/committed"));
  loop_.block_on(docker.remove("next"));
  EXPECT_FALSE(exists(root + "/l/" + next.link_id));
}

TEST_F(StoreTest, StagingSwapReplacesDiffAtomically) {
  LayerRecord base = create("base");
  write_file(h("base/diff/old"), "old");
  std::string staging = loop_.block_on(store_->make_staging_dir("base"));
  EXPECT_EQ(staging.rfind(home_ + "/.layerd-staging-apply-base-", 0), 0u) << staging;
  EXPECT_TRUE(is_dir(staging));
  EXPECT_EQ(mode_of(staging) & 07777, 0755u);
  ASSERT_EQ(::mkdir((staging + "/etc").c_str(), 0755), 0);
  write_file(staging + "/etc/hostname", "layerd");
  EXPECT_FALSE(loop_.block_on(store_->list()).size() != 1);

  loop_.block_on(store_->replace_diff("base", staging));
  EXPECT_EQ(read_file(h("base/diff/etc/hostname")), "layerd");
  EXPECT_FALSE(exists(h("base/diff/old")));
  EXPECT_FALSE(exists(staging));
  EXPECT_EQ(read_file(h("l/" + base.link_id + "/etc/hostname")), "layerd");
  for (const auto& ent : fs::directory_iterator(home_))
    EXPECT_EQ(ent.path().filename().string().rfind(".layerd-", 0), std::string::npos);

  // Only a staging dir of that very layer is accepted.
  create("other");
  std::string other = loop_.block_on(store_->make_staging_dir("other"));
  EXPECT_EQ(expect_error(loop_, store_->replace_diff("base", other)).errno_value(), EINVAL);
  EXPECT_EQ(expect_error(loop_, store_->replace_diff("base", h("base/diff"))).errno_value(),
            EINVAL);
  EXPECT_EQ(expect_error(loop_, store_->replace_diff("base", "/etc")).errno_value(), EINVAL);
  loop_.block_on(store_->discard_staging_dir(other));
  EXPECT_FALSE(exists(other));
  EXPECT_EQ(expect_error(loop_, store_->make_staging_dir("ghost")).errno_value(), ENOENT);
}

TEST_F(StoreTest, MarkCommittedIsIdempotent) {
  create("base");
  loop_.block_on(store_->mark_committed("base"));
  loop_.block_on(store_->mark_committed("base"));
  EXPECT_TRUE(loop_.block_on(store_->load("base")).committed);
  EXPECT_EQ(expect_error(loop_, store_->mark_committed("ghost")).errno_value(), ENOENT);
}

TEST_F(StoreTest, RelativeHomeIsMadeAbsolute) {
  char cwd[4096];
  ASSERT_NE(::getcwd(cwd, sizeof cwd), nullptr);
  ASSERT_EQ(::chdir(tmp_.c_str()), 0);
  Store rel("rel/home");
  ASSERT_EQ(::chdir(cwd), 0);
  EXPECT_EQ(rel.home(), tmp_ + "/rel/home");
}

}  // namespace
