// parse_mountinfo and MountTable: escapes, optional fields, lookups, and a real refresh of
// /proc/self/mountinfo.
#include <gtest/gtest.h>

#include <string>

#include "layerd/core/loop.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/watch/watch.hpp"

using namespace layerd;
using watch::MountEntry;
using watch::parse_mountinfo;

namespace {

constexpr const char* kSample =
    // No optional fields.
    "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n"
    // One optional field, a space and a tab in the mount point, a backslash in the source.
    "36 35 98:0 /mnt1 /mnt/with\\040space\\011tab rw,noatime master:1 - ext3 /dev/ro\\134ot "
    "rw,errors=continue\n"
    // Two optional fields, a newline in the mount point, fuse-overlayfs as layerd mounts it.
    "120 36 0:55 / /var/lib/layerd/abc/merged rw,nodev,relatime shared:7 master:3 - "
    "fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0,group_id=0,default_permissions\n"
    "121 36 0:56 / /odd\\012name rw - tmpfs tmpfs rw\n"
    // An empty source (two spaces) and a stacked mount on an existing mount point.
    "122 36 0:57 / /var/lib/layerd/abc/merged rw - tmpfs  rw,size=1024k\n"
    "garbage line\n"
    "\n";

TEST(ParseMountinfo, FieldsEscapesAndOptionalFields) {
  auto entries = parse_mountinfo(kSample);
  ASSERT_EQ(entries.size(), 5u);

  const MountEntry& proc = entries[0];
  EXPECT_EQ(proc.mount_id, 22);
  EXPECT_EQ(proc.parent_id, 1);
  EXPECT_EQ(proc.device, "0:21");
  EXPECT_EQ(proc.root, "/");
  EXPECT_EQ(proc.mount_point, "/proc");
  EXPECT_EQ(proc.options, "rw,nosuid,nodev,noexec,relatime");
  EXPECT_TRUE(proc.optional_fields.empty());
  EXPECT_EQ(proc.fstype, "proc");
  EXPECT_EQ(proc.source, "proc");
  EXPECT_EQ(proc.super_options, "rw");

  const MountEntry& ext = entries[1];
  EXPECT_EQ(ext.mount_id, 36);
  EXPECT_EQ(ext.parent_id, 35);
  EXPECT_EQ(ext.root, "/mnt1");
  EXPECT_EQ(ext.mount_point, "/mnt/with space\ttab");
  EXPECT_EQ(ext.optional_fields, std::vector<std::string>{"master:1"});
  EXPECT_EQ(ext.fstype, "ext3");
  EXPECT_EQ(ext.source, "/dev/ro\\ot");
  EXPECT_EQ(ext.super_options, "rw,errors=continue");

  const MountEntry& fuse = entries[2];
  EXPECT_EQ(fuse.optional_fields, (std::vector<std::string>{"shared:7", "master:3"}));
  EXPECT_EQ(fuse.fstype, "fuse.fuse-overlayfs");
  EXPECT_EQ(fuse.source, "fuse-overlayfs");
  EXPECT_EQ(fuse.mount_point, "/var/lib/layerd/abc/merged");

  EXPECT_EQ(entries[3].mount_point, "/odd\nname");
  EXPECT_EQ(entries[4].source, "");
  EXPECT_EQ(entries[4].super_options, "rw,size=1024k");
}

TEST(ParseMountinfo, EscapesDecodeOnlyThreeOctalDigits) {
  EXPECT_EQ(watch::decode_mountinfo_escapes("a\\040b"), "a b");
  EXPECT_EQ(watch::decode_mountinfo_escapes("\\134\\134"), "\\\\");
  EXPECT_EQ(watch::decode_mountinfo_escapes("trail\\04"), "trail\\04");
  EXPECT_EQ(watch::decode_mountinfo_escapes("x\\089"), "x\\089");
  EXPECT_EQ(watch::decode_mountinfo_escapes("\\"), "\\");
  EXPECT_TRUE(parse_mountinfo("").empty());
  EXPECT_TRUE(parse_mountinfo("1 2 3 4 5 6 - 7 8").empty());  // one field short
}

TEST(MountTable, FindUnderAndGeneration) {
  watch::MountTable table;
  EXPECT_EQ(table.generation(), 0u);
  table.assign(parse_mountinfo(kSample));
  EXPECT_EQ(table.generation(), 1u);
  table.assign(parse_mountinfo(kSample));
  EXPECT_EQ(table.generation(), 1u);  // unchanged content: no bump

  const MountEntry* top = table.find("/var/lib/layerd/abc/merged");
  ASSERT_NE(top, nullptr);
  EXPECT_EQ(top->mount_id, 122);  // the topmost of the stacked mounts
  EXPECT_TRUE(table.is_mounted("/proc"));
  EXPECT_FALSE(table.is_mounted("/var/lib/layerd"));
  EXPECT_FALSE(table.is_mounted("/proc/"));

  auto below = table.under("/var/lib/layerd");
  ASSERT_EQ(below.size(), 2u);
  EXPECT_EQ(below[0]->mount_id, 120);
  EXPECT_EQ(below[1]->mount_id, 122);
  EXPECT_EQ(table.under("/var/lib/layerd/").size(), 2u);
  EXPECT_TRUE(table.under("/var/lib/layerd/abc/merged").empty());  // strictly below
  EXPECT_TRUE(table.under("/var/lib/lay").empty());                // not a path prefix
  EXPECT_EQ(table.under("/").size(), 5u);
}

TEST(MountTable, RefreshReadsTheRealTable) {
  core::Loop loop;
  watch::MountTable table;
  loop.block_on(table.refresh());
  EXPECT_FALSE(table.entries().empty());
  EXPECT_TRUE(table.is_mounted("/")) << "no root mount in /proc/self/mountinfo";
  EXPECT_TRUE(table.is_mounted("/proc"));
  std::uint64_t gen = table.generation();
  EXPECT_GE(gen, 1u);
  // Reading again from offset 0 of the same fd yields the same table.
  loop.block_on(table.refresh());
  EXPECT_EQ(table.generation(), gen);
}

core::Task<void> refresh_and_count(watch::MountTable& table, int& done) {
  co_await table.refresh();
  ++done;
}

TEST(MountTable, ConcurrentRefreshesAllFinish) {
  core::Loop loop;
  watch::MountTable table;
  core::Scope scope;
  int done = 0;
  for (int i = 0; i < 8; ++i) scope.spawn(refresh_and_count(table, done));
  EXPECT_TRUE(loop.block_on(scope.join()));
  EXPECT_EQ(scope.failed(), 0u);
  EXPECT_EQ(done, 8);
  EXPECT_TRUE(table.is_mounted("/"));
}

}  // namespace
